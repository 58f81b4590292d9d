//! The TURN core, as two relay loops sharing quotas, ports and nonces, against random request
//! sequences, peer traffic, failed binds, closed connections, revocations and time, with the
//! invariants a user relies on checked after every step:
//! - no panic, whatever arrives;
//! - nothing is ever sent to a denied peer, and nothing relayed without a live allocation and
//!   permission;
//! - quotas (per user, total) are never exceeded;
//! - every relay socket bound is released when its allocation ends, and a reservation holds
//!   its port without one (the shell's sockets plus reservations equal the ports in use), also
//!   when its token is redeemed on the other loop;
//! - every channel the fast path was given is withdrawn when it, or its allocation, ends;
//! - after the longest lifetime has passed, nothing is left.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use rand::SeedableRng;
use rand::rngs::StdRng;

use rampart_rate_limit::RateLimit;
use rampart_turn::allocation::{Allocation, FastPathEvent};
use rampart_turn::auth::Credentials;
use rampart_turn::channel_data::encode_channel_data;
use rampart_turn::peer_policy::PeerPolicy;
use rampart_turn::server::{Output, PEER_HEADROOM, PEER_TAILROOM, Payload};
use rampart_turn::stun::{
    AddressFamily, Attribute, Class, Message, MessageBuilder, Method, TransactionId,
};
use rampart_turn::{
    FiveTuple, RelayAddress, Server, ServerConfig, SharedState, Transmit, Transport,
};

const REALM: &str = "rampart.test";
const SERVER: &str = "198.51.7.1:3478";
const RELAY_V4: &str = "198.51.7.1";
const RELAY_V6: &str = "2001:db8::7";
const PER_USER: usize = 2;
const TOTAL: usize = 4;
const MAX_LIFETIME: Duration = Duration::from_secs(3600);
const USERS: [(&str, &str); 2] = [("alice", "wonderland"), ("bob", "builder")];
/// Peers the policy allows, then peers it must never see a byte for.
const ALLOWED_PEERS: [&str; 3] = ["8.8.8.8:9000", "8.8.4.4:9001", "[2606:4700::1]:9000"];
const DENIED_PEERS: [&str; 4] = [
    "127.0.0.1:9000",
    "10.1.2.3:9000",
    "169.254.169.254:80",
    "198.51.7.1:3478",
];

#[allow(clippy::disallowed_methods)] // the tests' origin of time; its value never matters
fn origin() -> Instant {
    Instant::now()
}

fn config() -> ServerConfig {
    let relay_v4: IpAddr = RELAY_V4.parse().unwrap();
    let relay_v6: IpAddr = RELAY_V6.parse().unwrap();
    ServerConfig {
        realm: REALM.into(),
        software: None,
        relay_v4: Some(RelayAddress {
            bind: relay_v4,
            advertised: relay_v4,
        }),
        relay_v6: Some(RelayAddress {
            bind: relay_v6,
            advertised: relay_v6,
        }),
        // Small, so that the range runs out and failed binds matter.
        port_range: (50000, 50007),
        default_lifetime: Duration::from_secs(600),
        max_lifetime: MAX_LIFETIME,
        nonce_lifetime: Duration::from_secs(600),
        allocations_per_user: PER_USER,
        allocations_total: TOTAL,
        unauthenticated_limit: RateLimit {
            per_second: 1e6,
            burst: 1e6,
        },
        credentials: Credentials::new(
            USERS
                .iter()
                .map(|(u, p)| (u.to_string(), p.to_string()))
                .collect(),
            None,
        ),
        peer_connections_per_allocation: 8,
        consent: rampart_turn::server::Consent::Off,
        listener_sides: vec![],
        bandwidth: Default::default(),
        peer_policy: PeerPolicy::new(
            vec![],
            vec!["10.0.0.0/8".parse().unwrap()],
            vec![relay_v4, relay_v6],
            vec![SERVER.parse().unwrap()],
            Some((50000, 50007)),
        ),
    }
}

#[derive(Clone, Debug)]
enum Step {
    Allocate {
        client: usize,
        family: u8,
        even_port: Option<bool>,
        lifetime: Option<u32>,
    },
    Refresh {
        client: usize,
        lifetime: Option<u32>,
    },
    Permission {
        client: usize,
        peer: usize,
    },
    ChannelBind {
        client: usize,
        channel: u16,
        peer: usize,
    },
    ChannelData {
        client: usize,
        channel: u16,
        len: usize,
    },
    Send {
        client: usize,
        peer: usize,
        len: usize,
    },
    /// To the relay of `client`'s allocation, if it has one (else a port nobody holds).
    PeerSends {
        client: usize,
        v6: bool,
        peer: usize,
        len: usize,
    },
    Garbage {
        client: usize,
        bytes: Vec<u8>,
    },
    Close {
        client: usize,
    },
    Revoke {
        user: usize,
    },
    Advance {
        secs: u64,
    },
    /// An Allocate with one of the RESERVATION-TOKENs handed out so far.
    Redeem {
        client: usize,
        token: usize,
    },
    /// From now on the "system" refuses to bind this relay port (another process took it).
    TakePort {
        port: u16,
    },
}

const CLIENTS: usize = 6;
const PEERS: usize = ALLOWED_PEERS.len() + DENIED_PEERS.len();

fn step() -> impl Strategy<Value = Step> {
    let client = 0..CLIENTS;
    // Mostly peers the policy allows, so that data flows.
    let peer = prop_oneof![3 => 0..ALLOWED_PEERS.len(), 1 => ALLOWED_PEERS.len()..PEERS];
    let lifetime = prop_oneof![Just(None), Just(Some(0)), (1u32..5000).prop_map(Some)];
    prop_oneof![
        4 => (client.clone(), 0u8..4, prop_oneof![Just(None), any::<bool>().prop_map(Some)], lifetime.clone())
            .prop_map(|(client, family, even_port, lifetime)| Step::Allocate { client, family, even_port, lifetime }),
        1 => (client.clone(), lifetime).prop_map(|(client, lifetime)| Step::Refresh { client, lifetime }),
        3 => (client.clone(), peer.clone()).prop_map(|(client, peer)| Step::Permission { client, peer }),
        3 => (client.clone(), 0x3FFEu16..0x4003, peer.clone())
            .prop_map(|(client, channel, peer)| Step::ChannelBind { client, channel, peer }),
        3 => (client.clone(), 0x3FFFu16..0x4003, 0usize..40)
            .prop_map(|(client, channel, len)| Step::ChannelData { client, channel, len }),
        2 => (client.clone(), peer.clone(), 0usize..40).prop_map(|(client, peer, len)| Step::Send { client, peer, len }),
        4 => (client.clone(), any::<bool>(), peer.clone(), 0usize..40)
            .prop_map(|(client, v6, peer, len)| Step::PeerSends { client, v6, peer, len }),
        1 => (client.clone(), proptest::collection::vec(any::<u8>(), 0..64))
            .prop_map(|(client, bytes)| Step::Garbage { client, bytes }),
        1 => client.clone().prop_map(|client| Step::Close { client }),
        1 => (0..USERS.len()).prop_map(|user| Step::Revoke { user }),
        3 => prop_oneof![3 => 0u64..5, 1 => 250u64..400, 1 => 550u64..700].prop_map(|secs| Step::Advance { secs }),
        1 => (50000u16..50008).prop_map(|port| Step::TakePort { port }),
        2 => (client, 0usize..4).prop_map(|(client, token)| Step::Redeem { client, token }),
    ]
}

/// Relay loops, each with its own server, sharing quotas, ports and the nonce key.
const LOOPS: usize = 2;

/// The cores with a shell that checks everything they ask it to do.
struct World {
    servers: Vec<Server>,
    shared: Arc<SharedState>,
    /// RESERVATION-TOKENs from successful Allocates, redeemed or not.
    tokens: Vec<[u8; 8]>,
    now: Instant,
    bound: HashSet<SocketAddr>,
    taken_elsewhere: HashSet<u16>,
    /// Channels the fast path holds: (client, channel number) -> peer.
    fast_path: HashMap<(FiveTuple, u16), SocketAddr>,
    nonces: HashMap<usize, String>,
    next_tid: u32,
    denied: Vec<SocketAddr>,
}

impl World {
    fn new(seed: u64) -> Self {
        let now = origin();
        let shared = Arc::new(SharedState::for_config(&config(), [3; 32]));
        let servers = (0..LOOPS as u64)
            .map(|index| {
                Server::new(
                    config(),
                    shared.clone(),
                    StdRng::seed_from_u64(seed ^ index),
                    now,
                    Duration::from_secs(1_800_000_000),
                )
            })
            .collect();
        World {
            servers,
            shared,
            tokens: Vec::new(),
            now,
            bound: HashSet::new(),
            taken_elsewhere: HashSet::new(),
            fast_path: HashMap::new(),
            nonces: HashMap::new(),
            next_tid: 0,
            denied: DENIED_PEERS.iter().map(|p| p.parse().unwrap()).collect(),
        }
    }

    fn five_tuple(client: usize) -> FiveTuple {
        FiveTuple {
            // Every third client is on TCP: closing it ends its allocation.
            transport: if client % 3 == 2 {
                Transport::Tcp
            } else {
                Transport::Udp
            },
            client: SocketAddr::new([192, 0, 2, client as u8 + 1].into(), 4000),
            server: SERVER.parse().unwrap(),
        }
    }

    /// The loop a client's datagrams reach: users' clients spread over both loops, so the
    /// quotas are shared for real.
    fn loop_of(client: usize) -> usize {
        (client / 2) % LOOPS
    }

    fn allocation(&self, five_tuple: &FiveTuple) -> Option<&Allocation> {
        self.servers.iter().find_map(|s| s.allocation(five_tuple))
    }

    fn allocations(&self) -> impl Iterator<Item = &Allocation> {
        self.servers.iter().flat_map(Server::allocations)
    }

    fn peer(index: usize) -> SocketAddr {
        ALLOWED_PEERS
            .iter()
            .chain(DENIED_PEERS.iter())
            .nth(index)
            .unwrap()
            .parse()
            .unwrap()
    }

    /// Do what loop `at`'s core asked; returns the transmits, payloads resolved against `buf`.
    fn drain(&mut self, at: usize, buf: &[u8]) -> Vec<(Transmit, Vec<u8>)> {
        let mut sent = Vec::new();
        while let Some(output) = self.servers[at].poll_output() {
            match output {
                Output::Transmit(transmit) => {
                    let payload = match &transmit {
                        Transmit::ToClient { payload, .. } | Transmit::ToPeer { payload, .. } => {
                            payload
                        }
                    };
                    let bytes = match payload {
                        Payload::Message(message) => message.clone(),
                        Payload::InPlace(range) => buf[range.clone()].to_vec(),
                    };
                    sent.push((transmit, bytes));
                }
                Output::BindRelay { relay, .. } | Output::ListenRelay { relay } => {
                    let ok =
                        !self.taken_elsewhere.contains(&relay.port()) && self.bound.insert(relay);
                    self.servers[at].handle_bind_result(relay, ok, self.now);
                }
                Output::ReleaseRelay { relay } => {
                    assert!(self.bound.remove(&relay), "{relay} released but not bound");
                }
                Output::FastPath(FastPathEvent::Up(channel)) => {
                    let allocation = self.servers[at]
                        .allocation(&channel.five_tuple)
                        .expect("a channel goes up only on a live allocation");
                    assert!(allocation.relays.iter().any(|r| r.bound == channel.relay));
                    assert!(
                        !self.denied.contains(&channel.peer),
                        "fast path to a denied peer"
                    );
                    self.fast_path
                        .insert((channel.five_tuple, channel.channel), channel.peer);
                }
                Output::FastPath(FastPathEvent::Down(channel)) => {
                    assert!(
                        self.fast_path
                            .remove(&(channel.five_tuple, channel.channel))
                            .is_some(),
                        "a channel went down that was never up"
                    );
                }
                // The properties drive UDP clients only: TCP allocations are not asked for.
                Output::ConnectPeer { .. }
                | Output::SpliceConnection { .. }
                | Output::ClosePeerConnection { .. } => {
                    panic!("peer connection output without a TCP allocation: {output:?}")
                }
            }
        }
        for (transmit, _) in &sent {
            self.check_transmit(transmit);
        }
        sent
    }

    fn check_transmit(&self, transmit: &Transmit) {
        if let Transmit::ToPeer { relay, peer, .. } = transmit {
            assert!(!self.denied.contains(peer), "relayed to denied peer {peer}");
            let allocation = self
                .allocations()
                .find(|a| a.relays.iter().any(|r| r.bound == *relay))
                .expect("relayed from a relay no allocation holds");
            assert!(
                allocation
                    .permissions
                    .get(&peer.ip())
                    .is_some_and(|until| *until > self.now),
                "relayed to {peer} without a permission"
            );
        }
    }

    fn check_invariants(&self) {
        let mut per_user: HashMap<&str, usize> = HashMap::new();
        for allocation in self.allocations() {
            *per_user.entry(&allocation.quota_key).or_default() += 1;
        }
        assert!(per_user.values().all(|n| *n <= PER_USER), "{per_user:?}");
        assert!(self.allocations().count() <= TOTAL);
        assert_eq!(
            self.bound.len() + self.shared.reservations_held(),
            self.servers[0].relay_ports_in_use(),
            "sockets bound plus reservations and ports in use differ"
        );
        for (five_tuple, _) in self.fast_path.keys() {
            assert!(
                self.allocation(five_tuple).is_some(),
                "a channel outlived its allocation in the fast path"
            );
        }
    }

    /// A request from `client`, signed when a nonce is known, re-sent once after a challenge.
    fn call(&mut self, client: usize, method: Method, attributes: &[Attribute<'_>]) {
        for _ in 0..2 {
            self.next_tid += 1;
            let mut tid = [0u8; 12];
            tid[..4].copy_from_slice(&self.next_tid.to_be_bytes());
            let (user, password) = USERS[client % USERS.len()];
            let mut b = MessageBuilder::new(Class::Request, method, TransactionId(tid));
            for attribute in attributes {
                b.add(attribute);
            }
            if let Some(nonce) = self.nonces.get(&client) {
                b.sign_long_term(user, REALM, nonce, password);
            }
            let request = b.finish();
            let at = Self::loop_of(client);
            self.servers[at].handle_client_input(Self::five_tuple(client), &request, self.now);
            let sent = self.drain(at, &request);
            let Some((_, response)) = sent.first() else {
                return;
            };
            let message = Message::parse(response).expect("the server sends valid STUN");
            self.tokens.extend(message.reservation_token());
            match message.error_code() {
                Some((401 | 438, _)) => {
                    let nonce = message.nonce().expect("a challenge carries a nonce");
                    self.nonces.insert(client, nonce.to_owned());
                }
                _ => return,
            }
        }
    }

    fn run(&mut self, step: &Step) {
        match *step {
            Step::Allocate {
                client,
                family,
                even_port,
                lifetime,
            } => {
                let mut attributes = vec![Attribute::RequestedTransport(17)];
                match family {
                    1 => attributes.push(Attribute::RequestedAddressFamily(AddressFamily::V6)),
                    2 => attributes.push(Attribute::AdditionalAddressFamily(AddressFamily::V6)),
                    _ => {}
                }
                if let Some(reserve) = even_port {
                    attributes.push(Attribute::EvenPort { reserve });
                }
                if let Some(seconds) = lifetime {
                    attributes.push(Attribute::Lifetime(seconds));
                }
                self.call(client, Method::ALLOCATE, &attributes);
            }
            Step::Redeem { client, token } => {
                if let Some(token) = self.tokens.get(token).copied() {
                    let attributes = [
                        Attribute::RequestedTransport(17),
                        Attribute::ReservationToken(token),
                    ];
                    self.call(client, Method::ALLOCATE, &attributes);
                }
            }
            Step::Refresh { client, lifetime } => {
                let attributes: Vec<_> = lifetime.map(Attribute::Lifetime).into_iter().collect();
                self.call(client, Method::REFRESH, &attributes);
            }
            Step::Permission { client, peer } => {
                let peer = Attribute::XorPeerAddress(Self::peer(peer));
                self.call(client, Method::CREATE_PERMISSION, &[peer]);
            }
            Step::ChannelBind {
                client,
                channel,
                peer,
            } => {
                let attributes = [
                    Attribute::ChannelNumber(channel),
                    Attribute::XorPeerAddress(Self::peer(peer)),
                ];
                self.call(client, Method::CHANNEL_BIND, &attributes);
            }
            Step::ChannelData {
                client,
                channel,
                len,
            } => {
                let five_tuple = Self::five_tuple(client);
                let frame = encode_channel_data(
                    channel,
                    &vec![7; len],
                    five_tuple.transport != Transport::Udp,
                );
                let at = Self::loop_of(client);
                self.servers[at].handle_client_input(five_tuple, &frame, self.now);
                self.drain(at, &frame);
            }
            Step::Send { client, peer, len } => {
                let data = vec![9; len];
                let mut b =
                    MessageBuilder::new(Class::Indication, Method::SEND, TransactionId([1; 12]));
                b.add(&Attribute::XorPeerAddress(Self::peer(peer)))
                    .add(&Attribute::Data(&data));
                let indication = b.finish();
                let at = Self::loop_of(client);
                self.servers[at].handle_client_input(
                    Self::five_tuple(client),
                    &indication,
                    self.now,
                );
                self.drain(at, &indication);
            }
            Step::PeerSends {
                client,
                v6,
                peer,
                len,
            } => {
                // The relay socket belongs to the loop of the allocation that holds it.
                let at = Self::loop_of(client);
                let relay = self.servers[at]
                    .allocation(&Self::five_tuple(client))
                    .and_then(|a| a.relays.iter().find(|r| r.bound.is_ipv6() == v6))
                    .map_or(SocketAddr::new(RELAY_V4.parse().unwrap(), 50000), |r| {
                        r.bound
                    });
                let peer = Self::peer(peer);
                let mut buf = vec![0xAB; PEER_HEADROOM + len + PEER_TAILROOM];
                self.servers[at].handle_peer_input(relay, peer, &mut buf, len, self.now);
                for (transmit, bytes) in self.drain(at, &buf) {
                    let Transmit::ToClient { five_tuple, .. } = transmit else {
                        panic!("a peer's datagram goes to a client");
                    };
                    let allocation = self.servers[at]
                        .allocation(&five_tuple)
                        .expect("to a live allocation");
                    assert!(allocation.relays.iter().any(|r| r.bound == relay));
                    assert!(
                        allocation
                            .permissions
                            .get(&peer.ip())
                            .is_some_and(|t| *t > self.now)
                    );
                    assert!(bytes.len() >= len + 4);
                }
            }
            Step::Garbage { client, ref bytes } => {
                let at = Self::loop_of(client);
                self.servers[at].handle_client_input(Self::five_tuple(client), bytes, self.now);
                self.drain(at, bytes);
            }
            Step::Close { client } => {
                let five_tuple = Self::five_tuple(client);
                if five_tuple.transport != Transport::Udp {
                    let at = Self::loop_of(client);
                    self.servers[at].client_closed(five_tuple);
                    self.drain(at, &[]);
                }
            }
            Step::Revoke { user } => {
                // Refused for this second only, so that later steps are not all 401s.
                // Every loop is told, as the shell fans a revocation out.
                let until = self.servers[0].unix_time(self.now);
                for at in 0..LOOPS {
                    self.servers[at].revoke_user(USERS[user].0, until, self.now);
                    self.drain(at, &[]);
                }
            }
            Step::Advance { secs } => self.advance(Duration::from_secs(secs)),
            Step::TakePort { port } => {
                self.taken_elsewhere.insert(port);
            }
        }
        self.check_invariants();
    }

    /// Move the clock on, stopping at every deadline the core names on the way.
    fn advance(&mut self, by: Duration) {
        let until = self.now + by;
        for _ in 0..10_000 {
            let next = (0..LOOPS)
                .filter_map(|at| self.servers[at].poll_timeout().map(|d| (d, at)))
                .min();
            match next {
                Some((deadline, at)) if deadline <= until => {
                    self.now = self.now.max(deadline);
                    self.servers[at].handle_timeout(self.now);
                    assert!(self.drain(at, &[]).is_empty(), "timeouts send nothing");
                }
                _ => break,
            }
        }
        self.now = until;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn invariants_hold_over_random_sequences(seed in any::<u64>(), steps in proptest::collection::vec(step(), 1..120)) {
        let mut world = World::new(seed);
        for step in &steps {
            world.run(step);
        }
        // Past every lifetime, permission, channel, cool-down and reservation: nothing is left.
        world.advance(MAX_LIFETIME + Duration::from_secs(1200));
        prop_assert_eq!(world.allocations().count(), 0);
        prop_assert!(world.bound.is_empty(), "sockets left bound: {:?}", world.bound);
        prop_assert_eq!(world.shared.ports_in_use(), 0, "ports left in use");
        prop_assert!(world.fast_path.is_empty(), "channels left in the fast path");
        for server in &world.servers {
            prop_assert_eq!(server.poll_timeout(), None);
        }
    }
}
