//! One allocation (RFC 8656 §2.2): its relayed transport addresses, permissions and channel
//! bindings, each with its own expiry. Pure state: the server decides what is allowed, this
//! keeps the bookkeeping and the RFC's binding rules.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use crate::bandwidth::{Direction, TotalLease, TotalPool};
use crate::stun::TransactionId;

use crate::{FiveTuple, Transport};

/// RFC 8656 §9: permissions last 300 s unless refreshed.
pub const PERMISSION_LIFETIME: Duration = Duration::from_secs(300);
/// RFC 8656 §12: channel bindings last 600 s unless refreshed.
pub const CHANNEL_LIFETIME: Duration = Duration::from_secs(600);
/// RFC 8656 §12: after a binding expires, neither its number nor its peer may be bound to
/// something else for 5 more minutes, so late packets are not misdelivered.
pub const CHANNEL_COOL_DOWN: Duration = Duration::from_secs(300);

/// One relayed transport address of an allocation (one per address family).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Relay {
    /// Where the relay socket is bound.
    pub bound: SocketAddr,
    /// What clients are told (XOR-RELAYED-ADDRESS): the public address behind a 1:1 NAT.
    pub advertised: SocketAddr,
    pub expires: Instant,
}

/// Payload bytes relayed for one allocation, each way.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RelayedBytes {
    pub from_client: u64,
    pub to_client: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Channel {
    pub peer: SocketAddr,
    pub expires: Instant,
}

/// Why a ChannelBind is refused with 400 (RFC 8656 §11.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChannelConflict {
    /// The number is bound (or cooling down) for another peer.
    NumberInUse,
    /// The peer is bound (or cooling down) to another number.
    PeerInUse,
}

/// A channel the kernel may forward on its own (ChannelData <-> UDP) until `expires`: the
/// earliest of the channel's, its peer permission's and its relay's expiry, so forwarding
/// stops on time even if the agent is gone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FastPathChannel {
    pub five_tuple: FiveTuple,
    pub channel: u16,
    pub peer: SocketAddr,
    /// The relay socket's bound address (what peers' packets arrive at).
    pub relay: SocketAddr,
    pub expires: Instant,
    /// The allocation's bandwidth limit, which the kernel polices too, in one budget per
    /// allocation shared by its channels.
    pub bandwidth: Option<crate::bandwidth::BandwidthLimit>,
}

/// Which bandwidth limit refused a datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BandwidthRefusal {
    /// The allocation's own.
    Allocation,
    /// The agent's total.
    Total,
}

/// A change the fast path must apply: install or update a channel, or withdraw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FastPathEvent {
    Up(FastPathChannel),
    Down(FastPathChannel),
}

/// What an expiry sweep removed, for the events the shell and the XDP map driver act on.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Expired {
    pub relays: Vec<SocketAddr>,
    pub channels: Vec<(u16, SocketAddr)>,
    pub permissions: Vec<IpAddr>,
}

impl Expired {
    pub fn is_empty(&self) -> bool {
        self.relays.is_empty() && self.channels.is_empty() && self.permissions.is_empty()
    }
}

#[derive(Debug)]
pub struct Allocation {
    pub five_tuple: FiveTuple,
    /// Shared, not copied, with whatever lists the allocation (a status report lists
    /// thousands from the relay loop that owns them).
    pub username: std::sync::Arc<str>,
    pub quota_key: std::sync::Arc<str>,
    pub relays: Vec<Relay>,
    pub permissions: HashMap<IpAddr, Instant>,
    channels: HashMap<u16, Channel>,
    channel_of_peer: HashMap<SocketAddr, u16>,
    /// Expired bindings still holding their number and peer (RFC 8656 §12).
    cooling: Vec<(u16, SocketAddr, Instant)>,
    /// The Allocate transaction that created it, with the response sent: a retransmitted
    /// Allocate over UDP gets the same answer, not 437 (RFC 8656 §7.2).
    pub allocate_transaction: TransactionId,
    pub allocate_response: Vec<u8>,
    /// What the agent relayed in userspace, plus what the kernel had forwarded on channels
    /// since withdrawn from the fast path (credited back by the shell); channels still in
    /// the kernel are counted there.
    pub relayed: RelayedBytes,
    /// The channels last handed to the fast path, to send it only what changed.
    published: HashMap<u16, FastPathChannel>,
    /// A TCP allocation (RFC 6062): its relay is a listener, it relays over peer connections.
    pub tcp: bool,
    /// Made on an internal listener: its client is an internal party (consent).
    pub internal: bool,
    /// Permissions waiting for an internal party's consent: installed, their traffic dropped
    /// and counted, nothing of theirs in the fast path.
    pub held: HashSet<IpAddr>,
    /// Permissions towards internal addresses that have consent, by the internal user who
    /// gave it: a revocation of that user, or of their authorization, takes it back.
    pub consented_by: HashMap<IpAddr, std::sync::Arc<str>>,
    /// Made with credentials that name nobody (a bare-expiry REST username).
    pub anonymous: bool,
    /// The bandwidth limit of each direction and what it dropped (see [`crate::bandwidth`]).
    /// The kernel polices its channels there with buckets of its own: while both paths carry
    /// an allocation's data (a channel in the kernel, Send indications in userspace) each
    /// admits up to the limit.
    pub bandwidth: Option<crate::bandwidth::BandwidthLimit>,
    pub from_client_bucket: crate::bandwidth::Bucket,
    pub to_client_bucket: crate::bandwidth::Bucket,
    pub over_limit: RelayedBytes,
    /// A TCP allocation's peer connections, by peer (one per peer: RFC 6062 §5.2's 446).
    pub peer_connections: HashMap<SocketAddr, u32>,
}

impl Allocation {
    pub fn new(
        five_tuple: FiveTuple,
        username: std::sync::Arc<str>,
        quota_key: std::sync::Arc<str>,
        relays: Vec<Relay>,
        allocate_transaction: TransactionId,
    ) -> Self {
        Allocation {
            five_tuple,
            username,
            quota_key,
            relays,
            permissions: HashMap::new(),
            channels: HashMap::new(),
            channel_of_peer: HashMap::new(),
            cooling: Vec::new(),
            allocate_transaction,
            allocate_response: Vec::new(),
            relayed: RelayedBytes::default(),
            published: HashMap::new(),
            tcp: false,
            internal: false,
            held: HashSet::new(),
            consented_by: HashMap::new(),
            anonymous: false,
            bandwidth: None,
            from_client_bucket: crate::bandwidth::Bucket::default(),
            to_client_bucket: crate::bandwidth::Bucket::default(),
            over_limit: RelayedBytes::default(),
            peer_connections: HashMap::new(),
        }
    }

    /// The relay serving peers of `peer`'s address family.
    pub fn relay_for(&self, peer: &SocketAddr) -> Option<&Relay> {
        self.relays
            .iter()
            .find(|r| r.bound.is_ipv4() == peer.is_ipv4())
    }

    pub fn has_permission(&self, peer: IpAddr, now: Instant) -> bool {
        self.permissions.get(&peer).is_some_and(|exp| *exp > now)
    }

    /// Charges `bytes` in `direction` to the allocation's bucket, then to the agent's total
    /// (through this loop's `lease` of `pool`): the limit that refused them, if one did (the
    /// bytes are then counted in `over_limit`). The allocation comes first: one allocation
    /// over its own limit does not spend the total the others share.
    pub fn within_bandwidth(
        &mut self,
        direction: Direction,
        bytes: u64,
        now: Instant,
        lease: &mut TotalLease,
        pool: &TotalPool,
    ) -> Result<(), BandwidthRefusal> {
        let (bucket, over) = match direction {
            Direction::ToClient => (&mut self.to_client_bucket, &mut self.over_limit.to_client),
            Direction::FromClient => (
                &mut self.from_client_bucket,
                &mut self.over_limit.from_client,
            ),
        };
        let refusal = if self
            .bandwidth
            .as_ref()
            .is_some_and(|limit| !bucket.admit(limit, bytes, now))
        {
            BandwidthRefusal::Allocation
        } else if !lease.admit(pool, direction, bytes, now) {
            BandwidthRefusal::Total
        } else {
            return Ok(());
        };
        *over += bytes;
        Err(refusal)
    }

    /// Whether the permission for `peer` waits for consent (cheap when none does).
    pub fn holds(&self, peer: IpAddr) -> bool {
        !self.held.is_empty() && self.held.contains(&peer)
    }

    pub fn install_permission(&mut self, peer: IpAddr, now: Instant) {
        self.permissions.insert(peer, now + PERMISSION_LIFETIME);
    }

    pub fn channel(&self, number: u16, now: Instant) -> Option<SocketAddr> {
        self.channels
            .get(&number)
            .filter(|c| c.expires > now)
            .map(|c| c.peer)
    }

    pub fn channel_to(&self, peer: &SocketAddr, now: Instant) -> Option<u16> {
        self.channel_of_peer
            .get(peer)
            .copied()
            .filter(|n| self.channel(*n, now).is_some())
    }

    /// Installed permissions (expired ones go at the next sweep).
    pub fn permission_count(&self) -> usize {
        self.permissions.len()
    }

    pub fn channels(&self) -> impl Iterator<Item = (u16, &Channel)> {
        self.channels.iter().map(|(n, c)| (*n, c))
    }

    /// Bind or refresh `number` <-> `peer`; returns whether it is a new binding.
    pub fn bind_channel(
        &mut self,
        number: u16,
        peer: SocketAddr,
        now: Instant,
    ) -> Result<bool, ChannelConflict> {
        if let Some(existing) = self.channels.get(&number)
            && existing.peer != peer
        {
            return Err(ChannelConflict::NumberInUse);
        }
        if let Some(existing) = self.channel_of_peer.get(&peer)
            && *existing != number
        {
            return Err(ChannelConflict::PeerInUse);
        }
        for (n, p, _) in &self.cooling {
            if *n == number && *p != peer {
                return Err(ChannelConflict::NumberInUse);
            }
            if *p == peer && *n != number {
                return Err(ChannelConflict::PeerInUse);
            }
        }
        self.cooling.retain(|(n, _, _)| *n != number);
        let new = self
            .channels
            .insert(
                number,
                Channel {
                    peer,
                    expires: now + CHANNEL_LIFETIME,
                },
            )
            .is_none();
        self.channel_of_peer.insert(peer, number);
        self.install_permission(peer.ip(), now);
        Ok(new)
    }

    /// Drop everything that has expired by `now`.
    pub fn expire(&mut self, now: Instant) -> Expired {
        let mut expired = Expired::default();
        self.relays.retain(|r| {
            let keep = r.expires > now;
            if !keep {
                expired.relays.push(r.bound);
            }
            keep
        });
        self.permissions.retain(|ip, exp| {
            let keep = *exp > now;
            if !keep {
                expired.permissions.push(*ip);
            }
            keep
        });
        for ip in &expired.permissions {
            self.held.remove(ip);
            // A TCP connection outlives the permission it was made under (RFC 6062 clients do
            // not refresh it): its consent stays, to be taken back with it.
            if !self.peer_connections.keys().any(|peer| peer.ip() == *ip) {
                self.consented_by.remove(ip);
            }
        }
        let mut gone = Vec::new();
        self.channels.retain(|n, c| {
            let keep = c.expires > now;
            if !keep {
                gone.push((*n, c.peer, c.expires));
            }
            keep
        });
        for (n, peer, expired_at) in gone {
            self.channel_of_peer.remove(&peer);
            self.cooling.push((n, peer, expired_at + CHANNEL_COOL_DOWN));
            expired.channels.push((n, peer));
        }
        self.cooling.retain(|(_, _, until)| *until > now);
        expired
    }

    /// The channels the kernel may forward now. Only UDP clients: ChannelData on a TCP or TLS
    /// stream is framed inside the stream, which XDP does not see.
    fn fast_path_channels(&self, now: Instant) -> HashMap<u16, FastPathChannel> {
        if self.five_tuple.transport != Transport::Udp {
            return HashMap::new();
        }
        self.channels
            .iter()
            .filter_map(|(number, channel)| {
                if self.holds(channel.peer.ip()) {
                    return None;
                }
                let permission = *self.permissions.get(&channel.peer.ip())?;
                let relay = self.relay_for(&channel.peer)?;
                let expires = channel.expires.min(permission).min(relay.expires);
                (expires > now).then_some((
                    *number,
                    FastPathChannel {
                        five_tuple: self.five_tuple,
                        channel: *number,
                        peer: channel.peer,
                        relay: relay.bound,
                        expires,
                        bandwidth: self.bandwidth,
                    },
                ))
            })
            .collect()
    }

    /// Bring the fast path in line with this allocation: `Up` for new or changed channels,
    /// `Down` for those that are gone.
    pub fn sync_fast_path(&mut self, now: Instant, events: &mut impl Extend<FastPathEvent>) {
        let current = self.fast_path_channels(now);
        events.extend(
            self.published
                .iter()
                .filter(|(number, _)| !current.contains_key(number))
                .map(|(_, old)| FastPathEvent::Down(*old)),
        );
        events.extend(
            current
                .iter()
                .filter(|(number, new)| self.published.get(number) != Some(new))
                .map(|(_, new)| FastPathEvent::Up(*new)),
        );
        self.published = current;
    }

    /// Withdraw everything from the fast path (the allocation is going away).
    pub fn withdraw_fast_path(&mut self, events: &mut impl Extend<FastPathEvent>) {
        events.extend(self.published.drain().map(|(_, c)| FastPathEvent::Down(c)));
    }

    /// When [`Allocation::expire`] next has something to do: the earliest expiry of a relay,
    /// a permission, a channel or a cooling-down channel number.
    pub fn next_deadline(&self) -> Option<Instant> {
        let relays = self.relays.iter().map(|r| r.expires);
        let permissions = self.permissions.values().copied();
        let channels = self.channels.values().map(|c| c.expires);
        let cooling = self.cooling.iter().map(|(_, _, until)| *until);
        relays
            .chain(permissions)
            .chain(channels)
            .chain(cooling)
            .min()
    }

    /// Whether nothing is left to relay with.
    pub fn is_dead(&self) -> bool {
        self.relays.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alloc(now: Instant) -> Allocation {
        let ft = FiveTuple {
            transport: Transport::Udp,
            client: "192.0.2.1:4000".parse().unwrap(),
            server: "198.51.7.1:3478".parse().unwrap(),
        };
        let relay = Relay {
            bound: "198.51.7.1:50000".parse().unwrap(),
            advertised: "203.0.113.9:50000".parse().unwrap(),
            expires: now + Duration::from_secs(600),
        };
        Allocation::new(
            ft,
            "u".into(),
            "u".into(),
            vec![relay],
            TransactionId([0; 12]),
        )
    }

    const PEER: &str = "8.8.8.8:1000";

    #[test]
    fn permission_expires_after_300_seconds() {
        let t0 = crate::test_origin();
        let mut a = alloc(t0);
        let ip = "8.8.8.8".parse().unwrap();
        a.install_permission(ip, t0);
        assert!(a.has_permission(ip, t0 + Duration::from_secs(299)));
        assert!(!a.has_permission(ip, t0 + Duration::from_secs(300)));
        let expired = a.expire(t0 + Duration::from_secs(300));
        assert_eq!(expired.permissions, vec![ip]);
    }

    #[test]
    fn channel_binding_rules_and_cool_down() {
        let t0 = crate::test_origin();
        let mut a = alloc(t0);
        let peer: SocketAddr = PEER.parse().unwrap();
        let other: SocketAddr = "8.8.4.4:1000".parse().unwrap();
        assert_eq!(a.bind_channel(0x4000, peer, t0), Ok(true));
        assert!(
            a.has_permission(peer.ip(), t0),
            "ChannelBind installs a permission"
        );
        assert_eq!(a.bind_channel(0x4000, peer, t0), Ok(false), "refresh");
        assert_eq!(
            a.bind_channel(0x4000, other, t0),
            Err(ChannelConflict::NumberInUse)
        );
        assert_eq!(
            a.bind_channel(0x4001, peer, t0),
            Err(ChannelConflict::PeerInUse)
        );
        let t_exp = t0 + CHANNEL_LIFETIME;
        assert_eq!(a.channel(0x4000, t_exp), None);
        assert_eq!(a.expire(t_exp).channels, vec![(0x4000, peer)]);
        // Cooling down: the same pair may be re-bound, other pairings not.
        assert_eq!(
            a.bind_channel(0x4000, other, t_exp),
            Err(ChannelConflict::NumberInUse)
        );
        assert_eq!(a.bind_channel(0x4000, peer, t_exp), Ok(true));
        let t_free = t_exp + CHANNEL_LIFETIME + CHANNEL_COOL_DOWN;
        a.expire(t_free);
        assert_eq!(a.bind_channel(0x4000, other, t_free), Ok(true));
    }

    #[test]
    fn fast_path_follows_the_earliest_expiry_and_withdraws() {
        let t0 = crate::test_origin();
        let mut a = alloc(t0);
        let peer: SocketAddr = PEER.parse().unwrap();
        let mut events = Vec::new();
        a.bind_channel(0x4000, peer, t0).unwrap();
        a.sync_fast_path(t0, &mut events);
        let [FastPathEvent::Up(up)] = events[..] else {
            panic!("{events:?}")
        };
        // The permission (300 s) ends first.
        assert_eq!(up.expires, t0 + PERMISSION_LIFETIME);
        assert_eq!(up.relay, a.relays[0].bound);
        events.clear();
        a.sync_fast_path(t0, &mut events);
        assert!(events.is_empty(), "nothing changed, nothing sent");
        a.install_permission(peer.ip(), t0 + Duration::from_secs(100));
        a.sync_fast_path(t0 + Duration::from_secs(100), &mut events);
        assert!(
            matches!(events[..], [FastPathEvent::Up(c)] if c.expires == t0 + Duration::from_secs(400))
        );
        events.clear();
        let t_perm = t0 + Duration::from_secs(400);
        a.expire(t_perm);
        a.sync_fast_path(t_perm, &mut events);
        assert!(matches!(events[..], [FastPathEvent::Down(_)]));
        events.clear();
        a.install_permission(peer.ip(), t_perm);
        a.sync_fast_path(t_perm, &mut events);
        a.withdraw_fast_path(&mut events);
        assert!(matches!(
            events[..],
            [FastPathEvent::Up(_), FastPathEvent::Down(_)]
        ));
    }

    #[test]
    fn stream_clients_have_no_fast_path() {
        let t0 = crate::test_origin();
        let mut a = alloc(t0);
        a.five_tuple.transport = Transport::Tcp;
        a.bind_channel(0x4000, PEER.parse().unwrap(), t0).unwrap();
        let mut events = Vec::new();
        a.sync_fast_path(t0, &mut events);
        assert!(events.is_empty());
    }

    #[test]
    fn relay_expiry_kills_the_allocation() {
        let t0 = crate::test_origin();
        let mut a = alloc(t0);
        assert!(!a.is_dead());
        let expired = a.expire(t0 + Duration::from_secs(600));
        assert_eq!(expired.relays.len(), 1);
        assert!(a.is_dead());
    }
}
