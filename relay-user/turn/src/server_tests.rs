//! The state machine driven through whole client conversations and through time, with a fake
//! relay binder and an injected clock: no sockets, no sleeping.

use std::collections::{HashMap, HashSet};

use rand::SeedableRng;

use super::*;
use crate::auth::credentials::rest_password;
use crate::auth::{Credentials, RestSecrets};
use crate::channel_data::encode_channel_data;
use crate::peer_policy::PeerPolicy;

const SERVER: &str = "198.51.7.1:3478";
const RELAY_V4: &str = "198.51.7.1";
const PUBLIC_V4: &str = "203.0.113.50";
const RELAY_V6: &str = "2001:db8::7";
const PEER: &str = "8.8.8.8:9000";
const PEER_V6: &str = "[2606:4700::1]:9000";
const UNIX_T0: u64 = 1_800_000_000;

fn config() -> ServerConfig {
    let relay_v4: IpAddr = RELAY_V4.parse().unwrap();
    let relay_v6: IpAddr = RELAY_V6.parse().unwrap();
    ServerConfig {
        realm: "rampart.test".into(),
        software: None,
        relay_v4: Some(RelayAddress {
            bind: relay_v4,
            advertised: PUBLIC_V4.parse().unwrap(),
        }),
        relay_v6: Some(RelayAddress {
            bind: relay_v6,
            advertised: relay_v6,
        }),
        port_range: (50000, 50099),
        default_lifetime: Duration::from_secs(600),
        max_lifetime: Duration::from_secs(3600),
        nonce_lifetime: Duration::from_secs(600),
        allocations_per_user: 3,
        allocations_total: 100,
        unauthenticated_limit: RateLimit {
            per_second: 1000.0,
            burst: 1000.0,
        },
        credentials: Credentials::new(
            HashMap::from([
                ("alice".to_owned(), "wonderland".to_owned()),
                ("bob".to_owned(), "builder".to_owned()),
            ]),
            Some(RestSecrets::new(
                vec![b"current".to_vec(), b"previous".to_vec()],
                86_400,
            )),
        ),
        peer_connections_per_allocation: 8,
        consent: Consent::Off,
        listener_sides: vec![],
        bandwidth: Default::default(),
        peer_policy: PeerPolicy::new(
            vec![],
            vec![],
            vec![relay_v4, relay_v6, PUBLIC_V4.parse().unwrap()],
            vec![SERVER.parse().unwrap()],
            Some((50000, 50099)),
        ),
    }
}

/// The shell's side of relay binds: a set, with ports "other processes" hold.
#[derive(Default)]
struct FakeBinder {
    bound: HashSet<SocketAddr>,
    taken_elsewhere: HashSet<SocketAddr>,
}

struct Harness {
    server: Server,
    binder: FakeBinder,
    fast_path: Vec<FastPathEvent>,
    /// What the server asked of the shell for TCP allocations, in order.
    peer_connection_outputs: Vec<Output>,
    now: Instant,
}

impl Harness {
    fn new() -> Self {
        Self::with(config())
    }

    fn with(config: ServerConfig) -> Self {
        let now = crate::test_origin();
        Harness {
            server: Server::new(
                config.clone(),
                Arc::new(SharedState::for_config(&config, [7; 32])),
                StdRng::seed_from_u64(7),
                now,
                Duration::from_secs(UNIX_T0),
            ),
            binder: FakeBinder::default(),
            fast_path: Vec::new(),
            peer_connection_outputs: Vec::new(),
            now,
        }
    }

    /// Carry out what the server asked for, as a shell does: binds answered at once, in-place
    /// payloads read out of the buffer the input came in.
    fn drain(&mut self, buf: &[u8]) -> Vec<Transmit> {
        let mut transmits = Vec::new();
        while let Some(output) = self.server.poll_output() {
            match output {
                Output::Transmit(transmit) => transmits.push(resolve(transmit, buf)),
                Output::BindRelay { relay, .. } | Output::ListenRelay { relay } => {
                    let bound = !self.binder.taken_elsewhere.contains(&relay)
                        && self.binder.bound.insert(relay);
                    self.server.handle_bind_result(relay, bound, self.now);
                }
                Output::ReleaseRelay { relay } => {
                    assert!(self.binder.bound.remove(&relay), "released {relay} twice");
                }
                Output::FastPath(event) => self.fast_path.push(event),
                output @ (Output::ConnectPeer { .. }
                | Output::SpliceConnection { .. }
                | Output::ClosePeerConnection { .. }) => self.peer_connection_outputs.push(output),
            }
        }
        transmits
    }

    fn at_most_one(&mut self, buf: &[u8]) -> Option<Transmit> {
        let mut transmits = self.drain(buf);
        assert!(transmits.len() <= 1, "{transmits:?}");
        transmits.pop()
    }

    fn input(&mut self, five_tuple: FiveTuple, bytes: &[u8]) -> Option<Transmit> {
        self.server.handle_client_input(five_tuple, bytes, self.now);
        self.at_most_one(bytes)
    }

    /// Move the clock on by `secs`, stopping at every deadline the server names on the way.
    fn advance(&mut self, secs: u64) {
        let until = self.now + Duration::from_secs(secs);
        while let Some(deadline) = self.server.poll_timeout().filter(|d| *d <= until) {
            self.now = self.now.max(deadline);
            self.server.handle_timeout(self.now);
            assert!(self.drain(&[]).is_empty(), "timeouts send nothing");
        }
        self.now = until;
    }

    fn peer_sends(&mut self, relay: SocketAddr, peer: &str, data: &[u8]) -> Option<Transmit> {
        let mut buf = vec![0xEE; PEER_HEADROOM + data.len() + PEER_TAILROOM];
        buf[PEER_HEADROOM..][..data.len()].copy_from_slice(data);
        self.server
            .handle_peer_input(relay, peer.parse().unwrap(), &mut buf, data.len(), self.now);
        self.at_most_one(&buf)
    }

    fn take_fast_path_events(&mut self) -> Vec<FastPathEvent> {
        std::mem::take(&mut self.fast_path)
    }
}

/// A transmit with its payload as the bytes that would leave.
fn resolve(transmit: Transmit, buf: &[u8]) -> Transmit {
    let bytes = |payload: Payload| match payload {
        Payload::InPlace(range) => Payload::Message(buf[range].to_vec()),
        message => message,
    };
    match transmit {
        Transmit::ToClient {
            five_tuple,
            payload,
        } => Transmit::ToClient {
            five_tuple,
            payload: bytes(payload),
        },
        Transmit::ToPeer {
            relay,
            peer,
            payload,
        } => Transmit::ToPeer {
            relay,
            peer,
            payload: bytes(payload),
        },
    }
}

fn five_tuple(client: &str) -> FiveTuple {
    FiveTuple {
        transport: Transport::Udp,
        client: client.parse().unwrap(),
        server: SERVER.parse().unwrap(),
    }
}

/// A TURN client speaking through the harness, doing the 401 dance itself.
struct Client {
    five_tuple: FiveTuple,
    username: String,
    password: String,
    sha256: bool,
    nonce: Option<String>,
    next_tid: u8,
}

impl Client {
    fn new(client: &str, username: &str, password: &str) -> Self {
        Client {
            five_tuple: five_tuple(client),
            username: username.into(),
            password: password.into(),
            sha256: false,
            nonce: None,
            next_tid: 1,
        }
    }

    fn tid(&mut self) -> TransactionId {
        self.next_tid += 1;
        TransactionId([self.next_tid; 12])
    }

    fn build(&self, tid: TransactionId, method: Method, attrs: &[Attribute<'_>]) -> Vec<u8> {
        let mut b = MessageBuilder::new(Class::Request, method, tid);
        for a in attrs {
            b.add(a);
        }
        if let Some(nonce) = &self.nonce {
            b.add(&Attribute::Username(&self.username))
                .add(&Attribute::Realm("rampart.test"))
                .add(&Attribute::Nonce(nonce));
            let algorithm = if self.sha256 {
                b.add(&Attribute::PasswordAlgorithms(OFFERED_ALGORITHMS.to_vec()))
                    .add(&Attribute::PasswordAlgorithm(ALGORITHM_SHA256, &[]));
                PasswordAlgorithm::Sha256
            } else {
                PasswordAlgorithm::Md5
            };
            let key = long_term_key(&self.username, "rampart.test", &self.password, algorithm);
            if self.sha256 {
                b.add_message_integrity_sha256(&key);
            } else {
                b.add_message_integrity(&key);
            }
        }
        b.add_fingerprint();
        b.finish()
    }

    /// Send a request, answering 401/438 challenges; returns the final response bytes.
    fn call(&mut self, h: &mut Harness, method: Method, attrs: &[Attribute<'_>]) -> Vec<u8> {
        for _ in 0..3 {
            let tid = self.tid();
            let request = self.build(tid, method, attrs);
            let response = client_payload(h.input(self.five_tuple, &request));
            let challenge = {
                let message = Message::parse(&response).expect("server sends valid STUN");
                assert_eq!(message.transaction_id, tid);
                match message.error_code() {
                    Some((401, _)) if self.nonce.is_none() => message.nonce().map(str::to_owned),
                    Some((438, _)) => message.nonce().map(str::to_owned),
                    _ => None,
                }
            };
            match challenge {
                Some(nonce) => self.nonce = Some(nonce),
                None => return response,
            }
        }
        panic!("no answer past the challenges");
    }

    fn allocate(&mut self, h: &mut Harness, extra: &[Attribute<'_>]) -> Vec<u8> {
        let mut attrs = vec![Attribute::RequestedTransport(17)];
        attrs.extend_from_slice(extra);
        self.call(h, Method::ALLOCATE, &attrs)
    }
}

fn client_payload(t: Option<Transmit>) -> Vec<u8> {
    match t {
        Some(Transmit::ToClient {
            payload: Payload::Message(payload),
            ..
        }) => payload,
        other => panic!("expected a message to the client, got {other:?}"),
    }
}

fn code(response: &[u8]) -> Option<u16> {
    Message::parse(response)
        .unwrap()
        .error_code()
        .map(|(c, _)| c)
}

fn relayed(response: &[u8]) -> Vec<SocketAddr> {
    Message::parse(response)
        .unwrap()
        .xor_relayed_addresses()
        .collect()
}

fn bound_relay(h: &Harness, client: &Client) -> SocketAddr {
    h.server.allocation(&client.five_tuple).unwrap().relays[0].bound
}

#[test]
fn binding_returns_the_reflexive_address() {
    let mut h = Harness::new();
    let ft = five_tuple("192.0.2.1:5555");
    let request =
        MessageBuilder::new(Class::Request, Method::BINDING, TransactionId([9; 12])).finish();
    let response = client_payload(h.input(ft, &request));
    let message = Message::parse(&response).unwrap();
    assert_eq!(message.class, Class::SuccessResponse);
    assert_eq!(message.xor_mapped_address(), Some(ft.client));
    assert!(
        message.software().is_none(),
        "SOFTWARE is omitted by default"
    );
}

#[test]
fn allocate_challenge_then_success_with_public_relay_address() {
    let mut h = Harness::new();
    let mut alice = Client::new("192.0.2.1:5555", "alice", "wonderland");
    let unauthenticated = alice.build(
        TransactionId([1; 12]),
        Method::ALLOCATE,
        &[Attribute::RequestedTransport(17)],
    );
    let challenge = client_payload(h.input(alice.five_tuple, &unauthenticated));
    let challenge = Message::parse(&challenge).unwrap();
    assert_eq!(challenge.error_code().unwrap().0, 401);
    assert_eq!(challenge.realm(), Some("rampart.test"));
    assert!(challenge.nonce().unwrap().starts_with("obMatJos2"));
    assert_eq!(
        challenge.password_algorithms().unwrap(),
        OFFERED_ALGORITHMS.as_slice()
    );

    let response = alice.allocate(&mut h, &[]);
    let message = Message::parse(&response).unwrap();
    assert_eq!(
        message.class,
        Class::SuccessResponse,
        "{:?}",
        message.error_code()
    );
    let relay = relayed(&response)[0];
    assert_eq!(
        relay.ip(),
        PUBLIC_V4.parse::<IpAddr>().unwrap(),
        "NAT address is advertised"
    );
    assert!((50000..=50099).contains(&relay.port()));
    assert_eq!(message.lifetime(), Some(600));
    assert_eq!(message.xor_mapped_address(), Some(alice.five_tuple.client));
    let key = long_term_key(
        "alice",
        "rampart.test",
        "wonderland",
        PasswordAlgorithm::Md5,
    );
    assert!(
        message.verify_integrity(&key),
        "responses are integrity-protected"
    );
    assert_eq!(h.binder.bound.len(), 1);
}

#[test]
fn sha256_password_algorithm_and_message_integrity_sha256() {
    let mut h = Harness::new();
    let mut alice = Client::new("192.0.2.1:5555", "alice", "wonderland");
    alice.sha256 = true;
    let response = alice.allocate(&mut h, &[]);
    let message = Message::parse(&response).unwrap();
    assert_eq!(message.class, Class::SuccessResponse);
    assert_eq!(message.integrity_kind(), Some(IntegrityKind::Sha256));
    let key = long_term_key(
        "alice",
        "rampart.test",
        "wonderland",
        PasswordAlgorithm::Sha256,
    );
    assert!(message.verify_integrity(&key));
}

#[test]
fn wrong_password_is_401_and_nothing_is_allocated() {
    let mut h = Harness::new();
    let mut mallory = Client::new("192.0.2.66:5555", "alice", "guess");
    let response = mallory.allocate(&mut h, &[]);
    assert_eq!(code(&response), Some(401));
    let mut nobody = Client::new("192.0.2.66:5556", "nobody", "guess");
    assert_eq!(code(&nobody.allocate(&mut h, &[])), Some(401));
    assert_eq!(h.server.allocation_count(), 0);
    assert_eq!(h.server.stats().auth_failures, 2);
}

#[test]
fn stale_nonce_is_438_with_a_fresh_nonce() {
    let mut h = Harness::new();
    let mut alice = Client::new("192.0.2.1:5555", "alice", "wonderland");
    assert_eq!(code(&alice.allocate(&mut h, &[])), None);
    let old_nonce = alice.nonce.clone().unwrap();
    h.advance(601);
    let tid = alice.tid();
    let request = alice.build(tid, Method::REFRESH, &[]);
    let response = client_payload(h.input(alice.five_tuple, &request));
    let message = Message::parse(&response).unwrap();
    assert_eq!(message.error_code().unwrap().0, 438);
    assert_ne!(message.nonce().unwrap(), old_nonce);
    // A nonce issued for another client address is no good either.
    let mut thief = Client::new("192.0.2.99:5555", "alice", "wonderland");
    thief.nonce = alice.nonce.clone();
    let tid = thief.tid();
    let stolen = thief.build(tid, Method::ALLOCATE, &[Attribute::RequestedTransport(17)]);
    assert_eq!(
        code(&client_payload(h.input(thief.five_tuple, &stolen))),
        Some(438)
    );
}

#[test]
fn rest_credentials_with_both_secrets_and_quota_on_the_user_part() {
    let mut h = Harness::new();
    let expiry = UNIX_T0 + 3600;
    let mut clients = Vec::new();
    for (i, secret) in [&b"current"[..], b"previous", b"current", b"previous"]
        .iter()
        .enumerate()
    {
        // Different usernames (expiry differs), same user: the quota still applies.
        let username = format!("{}:carol", expiry + i as u64);
        let password = rest_password(secret, &username);
        let mut c = Client::new(&format!("192.0.2.{}:4000", i + 1), &username, &password);
        let response = c.allocate(&mut h, &[]);
        clients.push((c, code(&response)));
    }
    let codes: Vec<_> = clients.iter().map(|(_, c)| *c).collect();
    assert_eq!(codes, vec![None, None, None, Some(486)]);
    // Expired REST credentials are refused.
    let username = format!("{}:dave", UNIX_T0 - 1);
    let password = rest_password(b"current", &username);
    let mut late = Client::new("192.0.2.50:4000", &username, &password);
    assert_eq!(code(&late.allocate(&mut h, &[])), Some(401));
}

#[test]
fn allocation_quota_is_486_and_freed_by_delete() {
    let mut h = Harness::new();
    let mut clients: Vec<Client> = (0..4)
        .map(|i| Client::new(&format!("192.0.2.{}:4000", i + 1), "bob", "builder"))
        .collect();
    let codes: Vec<_> = clients
        .iter_mut()
        .map(|c| code(&c.allocate(&mut h, &[])))
        .collect();
    assert_eq!(codes, vec![None, None, None, Some(486)]);
    let response = clients[0].call(&mut h, Method::REFRESH, &[Attribute::Lifetime(0)]);
    assert_eq!(code(&response), None);
    assert_eq!(code(&clients[3].allocate(&mut h, &[])), None);
    assert_eq!(h.server.stats().quota_rejections, 1);
}

#[test]
fn retransmitted_allocate_gets_the_same_answer_other_allocate_437() {
    let mut h = Harness::new();
    let mut alice = Client::new("192.0.2.1:5555", "alice", "wonderland");
    let first = alice.allocate(&mut h, &[]);
    let tid = TransactionId([alice.next_tid; 12]);
    let again = alice.build(tid, Method::ALLOCATE, &[Attribute::RequestedTransport(17)]);
    assert_eq!(client_payload(h.input(alice.five_tuple, &again)), first);
    assert_eq!(code(&alice.allocate(&mut h, &[])), Some(437));
    // Another user on the same 5-tuple: wrong credentials.
    let mut bob = Client::new("192.0.2.1:5555", "bob", "builder");
    assert_eq!(code(&bob.call(&mut h, Method::REFRESH, &[])), Some(441));
}

#[test]
fn unsupported_transport_and_address_families() {
    let mut h = Harness::new();
    let mut alice = Client::new("192.0.2.1:5555", "alice", "wonderland");
    assert_eq!(
        code(&alice.call(
            &mut h,
            Method::ALLOCATE,
            &[Attribute::RequestedTransport(132)]
        )),
        Some(442)
    );
    assert_eq!(code(&alice.call(&mut h, Method::ALLOCATE, &[])), Some(400));
    let mut v4_only = config();
    v4_only.relay_v6 = None;
    let mut h4 = Harness::with(v4_only);
    let mut c = Client::new("192.0.2.1:5555", "alice", "wonderland");
    let response = c.allocate(
        &mut h4,
        &[Attribute::RequestedAddressFamily(AddressFamily::V6)],
    );
    assert_eq!(code(&response), Some(440));
    // Dual-stack asked of a v4-only relay: v4 granted, v6 refused inside the success.
    let response = c.allocate(
        &mut h4,
        &[Attribute::AdditionalAddressFamily(AddressFamily::V6)],
    );
    let message = Message::parse(&response).unwrap();
    assert_eq!(message.class, Class::SuccessResponse);
    assert!(message.attributes().any(|a| matches!(
        a,
        Attribute::AddressErrorCode {
            family: AddressFamily::V6,
            code: 440,
            ..
        }
    )));
}

/// coturn's client asks for the second family with the draft number 0x8032, which coturn's
/// server takes as ADDITIONAL-ADDRESS-FAMILY: so does this one, and counts it.
#[test]
fn the_draft_additional_address_family_attribute_gets_a_dual_allocation() {
    let (mut h, _) = dual_allocation(Attribute::LegacyAdditionalAddressFamily(AddressFamily::V6));
    assert_eq!(h.server.stats().legacy_additional_address_family, 1);
    // With REQUESTED-ADDRESS-FAMILY: RFC 8656 §7.2's 400, as under the RFC's number.
    let mut bob = Client::new("192.0.2.2:5555", "alice", "wonderland");
    let response = bob.allocate(
        &mut h,
        &[
            Attribute::RequestedAddressFamily(AddressFamily::V6),
            Attribute::LegacyAdditionalAddressFamily(AddressFamily::V6),
        ],
    );
    assert_eq!(code(&response), Some(400));
    // A second family refused is told under 0x8033 as well, the draft ADDRESS-ERROR-CODE a
    // client that asked with 0x8032 reads (coturn before #1748, as Debian's 4.6).
    let mut v4_only = config();
    v4_only.relay_v6 = None;
    let mut h4 = Harness::with(v4_only);
    let mut carol = Client::new("192.0.2.3:5555", "alice", "wonderland");
    let response = carol.allocate(
        &mut h4,
        &[Attribute::LegacyAdditionalAddressFamily(AddressFamily::V6)],
    );
    let message = Message::parse(&response).unwrap();
    assert_eq!(message.class, Class::SuccessResponse);
    let refusals: Vec<u16> = message
        .attributes()
        .filter_map(|a| match a {
            Attribute::AddressErrorCode { code, .. } => Some(*code),
            Attribute::LegacyAddressErrorCode { code, .. } => Some(*code),
            _ => None,
        })
        .collect();
    assert_eq!(refusals, [440, 440]);
}

/// alice's allocation asking for a second family with `additional`: an IPv4 and an IPv6 relay.
fn dual_allocation(additional: Attribute<'static>) -> (Harness, Client) {
    let mut h = Harness::new();
    let mut alice = Client::new("192.0.2.1:5555", "alice", "wonderland");
    let relays = relayed(&alice.allocate(&mut h, &[additional]));
    assert_eq!(relays.len(), 2);
    assert!(relays[0].is_ipv4() && relays[1].is_ipv6());
    (h, alice)
}

#[test]
fn dual_stack_allocation_relays_both_families() {
    let (mut h, mut alice) = dual_allocation(Attribute::AdditionalAddressFamily(AddressFamily::V6));
    let peers = [
        Attribute::XorPeerAddress(PEER.parse().unwrap()),
        Attribute::XorPeerAddress(PEER_V6.parse().unwrap()),
    ];
    assert_eq!(
        code(&alice.call(&mut h, Method::CREATE_PERMISSION, &peers)),
        None
    );
    // Refresh only the IPv6 relay with lifetime 0: the IPv4 one stays.
    let response = alice.call(
        &mut h,
        Method::REFRESH,
        &[
            Attribute::Lifetime(0),
            Attribute::RequestedAddressFamily(AddressFamily::V6),
        ],
    );
    assert_eq!(code(&response), None);
    let allocation = h.server.allocation(&alice.five_tuple).unwrap();
    assert_eq!(allocation.relays.len(), 1);
    assert!(allocation.relays[0].bound.is_ipv4());
    assert_eq!(
        code(&alice.call(
            &mut h,
            Method::REFRESH,
            &[Attribute::RequestedAddressFamily(AddressFamily::V6)]
        )),
        Some(443)
    );
}

#[test]
fn even_port_reservation_gives_the_next_port_to_the_token_holder() {
    let mut h = Harness::new();
    let mut alice = Client::new("192.0.2.1:5555", "alice", "wonderland");
    let response = alice.allocate(&mut h, &[Attribute::EvenPort { reserve: true }]);
    let message = Message::parse(&response).unwrap();
    let port = relayed(&response)[0].port();
    assert_eq!(port % 2, 0);
    let token = message.reservation_token().expect("token");
    let mut rtcp = Client::new("192.0.2.1:5556", "alice", "wonderland");
    let response = rtcp.allocate(&mut h, &[Attribute::ReservationToken(token)]);
    assert_eq!(relayed(&response)[0].port(), port + 1);
    // A token is good once; a made-up one is 508.
    let mut third = Client::new("192.0.2.1:5557", "alice", "wonderland");
    assert_eq!(
        code(&third.allocate(&mut h, &[Attribute::ReservationToken(token)])),
        Some(508)
    );
    // Unused reservations are released after 30 s.
    let mut fourth = Client::new("192.0.2.2:5557", "bob", "builder");
    fourth.allocate(&mut h, &[Attribute::EvenPort { reserve: true }]);
    assert_eq!(h.server.relay_ports_in_use(), 4);
    h.advance(31);
    assert_eq!(h.server.relay_ports_in_use(), 3);
}

#[test]
fn denied_peers_get_403_on_every_path() {
    let mut h = Harness::new();
    let mut alice = Client::new("192.0.2.1:5555", "alice", "wonderland");
    alice.allocate(
        &mut h,
        &[Attribute::AdditionalAddressFamily(AddressFamily::V6)],
    );
    for peer in [
        "[::ffff:127.0.0.1]:9000",
        "0.0.0.0:9000",
        "[::]:9000",
        "169.254.169.254:80",
        "127.0.0.1:9000",
        "10.0.0.1:9000",
        "[fd00::1]:9000",
        "203.0.113.50:50001",
        "[::ffff:10.0.0.1]:9000",
    ] {
        let peer: SocketAddr = peer.parse().unwrap();
        let response = alice.call(
            &mut h,
            Method::CREATE_PERMISSION,
            &[Attribute::XorPeerAddress(peer)],
        );
        assert_eq!(code(&response), Some(403), "CreatePermission {peer}");
        let response = alice.call(
            &mut h,
            Method::CHANNEL_BIND,
            &[
                Attribute::ChannelNumber(0x4000),
                Attribute::XorPeerAddress(peer),
            ],
        );
        assert_eq!(code(&response), Some(403), "ChannelBind {peer}");
        let mut b = MessageBuilder::new(Class::Indication, Method::SEND, TransactionId([3; 12]));
        b.add(&Attribute::XorPeerAddress(peer))
            .add(&Attribute::Data(b"x"));
        assert_eq!(h.input(alice.five_tuple, &b.finish()), None, "Send {peer}");
    }
    assert!(h.server.stats().forbidden_peers >= 24);
    assert_eq!(h.server.stats().to_peer_packets, 0);
}

#[test]
fn relay_to_relay_is_allowed_but_not_the_servers_own_listeners() {
    let mut h = Harness::new();
    let mut alice = Client::new("192.0.2.1:5555", "alice", "wonderland");
    let mut bob = Client::new("192.0.2.2:5555", "bob", "builder");
    alice.allocate(&mut h, &[]);
    bob.allocate(&mut h, &[]);
    let bob_relay = bound_relay(&h, &bob);
    let bind = [
        Attribute::ChannelNumber(0x4000),
        Attribute::XorPeerAddress(bob_relay),
    ];
    assert_eq!(code(&alice.call(&mut h, Method::CHANNEL_BIND, &bind)), None);
    let listener = [
        Attribute::ChannelNumber(0x4001),
        Attribute::XorPeerAddress(SERVER.parse().unwrap()),
    ];
    assert_eq!(
        code(&alice.call(&mut h, Method::CHANNEL_BIND, &listener)),
        Some(403)
    );
}

#[test]
fn allowed_internal_network_is_relayed() {
    let mut cfg = config();
    let relay_v4: IpAddr = RELAY_V4.parse().unwrap();
    cfg.peer_policy = PeerPolicy::new(
        vec!["10.0.0.0/8".parse().unwrap()],
        vec![],
        vec![relay_v4],
        vec![SERVER.parse().unwrap()],
        Some((50000, 50099)),
    );
    let mut h = Harness::with(cfg);
    let mut alice = Client::new("192.0.2.1:5555", "alice", "wonderland");
    alice.allocate(&mut h, &[]);
    let peer = Attribute::XorPeerAddress("10.1.1.1:7000".parse().unwrap());
    assert_eq!(
        code(&alice.call(&mut h, Method::CREATE_PERMISSION, &[peer])),
        None
    );
}

#[test]
fn data_flows_through_channels_and_indications_until_they_expire() {
    let mut h = Harness::new();
    let mut alice = Client::new("192.0.2.1:5555", "alice", "wonderland");
    alice.allocate(&mut h, &[Attribute::Lifetime(3600)]);
    let relay = bound_relay(&h, &alice);
    let peer: SocketAddr = PEER.parse().unwrap();

    // No permission yet: nothing in either direction.
    assert_eq!(h.peer_sends(relay, PEER, b"early"), None);
    let permission = [Attribute::XorPeerAddress(peer)];
    assert_eq!(
        code(&alice.call(&mut h, Method::CREATE_PERMISSION, &permission)),
        None
    );

    // Send indication -> peer; peer -> Data indication.
    let mut b = MessageBuilder::new(Class::Indication, Method::SEND, TransactionId([3; 12]));
    b.add(&Attribute::XorPeerAddress(peer))
        .add(&Attribute::Data(b"hello"));
    assert_eq!(
        h.input(alice.five_tuple, &b.finish()),
        Some(Transmit::ToPeer {
            relay,
            peer,
            payload: Payload::Message(b"hello".to_vec())
        })
    );
    let data = client_payload(h.peer_sends(relay, PEER, b"hi back"));
    let data = Message::parse(&data).unwrap();
    assert_eq!((data.class, data.method), (Class::Indication, Method::DATA));
    assert_eq!(data.data(), Some(&b"hi back"[..]));
    assert_eq!(data.xor_peer_addresses().next(), Some(peer));

    // ChannelBind -> ChannelData both ways.
    let bind = [
        Attribute::ChannelNumber(0x4001),
        Attribute::XorPeerAddress(peer),
    ];
    assert_eq!(code(&alice.call(&mut h, Method::CHANNEL_BIND, &bind)), None);
    assert_eq!(
        h.input(
            alice.five_tuple,
            &encode_channel_data(0x4001, b"media", false)
        ),
        Some(Transmit::ToPeer {
            relay,
            peer,
            payload: Payload::Message(b"media".to_vec())
        })
    );
    assert_eq!(
        client_payload(h.peer_sends(relay, PEER, b"media back")),
        encode_channel_data(0x4001, b"media back", false)
    );

    // Permission lapses at 300 s even though the channel lives 600 s.
    h.advance(300);
    assert_eq!(h.peer_sends(relay, PEER, b"late"), None);
    assert_eq!(
        h.input(alice.five_tuple, &encode_channel_data(0x4001, b"x", false)),
        None
    );
    // Re-binding refreshes both; the channel then lapses at 600 s after that.
    assert_eq!(code(&alice.call(&mut h, Method::CHANNEL_BIND, &bind)), None);
    h.advance(299);
    assert!(h.peer_sends(relay, PEER, b"ok").is_some());
    alice.nonce = None;
    assert_eq!(
        code(&alice.call(&mut h, Method::CREATE_PERMISSION, &permission)),
        None
    );
    h.advance(200);
    assert!(
        h.input(alice.five_tuple, &encode_channel_data(0x4001, b"x", false))
            .is_some()
    );
    h.advance(101);
    assert_eq!(
        h.input(alice.five_tuple, &encode_channel_data(0x4001, b"x", false)),
        None
    );
    // Without the channel, the peer's data comes back as a Data indication.
    assert_eq!(
        code(&alice.call(&mut h, Method::CREATE_PERMISSION, &permission)),
        None
    );
    let data = client_payload(h.peer_sends(relay, PEER, b"no channel"));
    assert_eq!(Message::parse(&data).unwrap().method, Method::DATA);
}

#[test]
fn allocations_expire_refresh_extends_and_ports_are_released() {
    let mut h = Harness::new();
    let mut alice = Client::new("192.0.2.1:5555", "alice", "wonderland");
    alice.allocate(&mut h, &[]);
    h.advance(500);
    alice.nonce = None;
    let response = alice.call(&mut h, Method::REFRESH, &[Attribute::Lifetime(900)]);
    assert_eq!(Message::parse(&response).unwrap().lifetime(), Some(900));
    h.advance(899);
    assert_eq!(h.server.allocation_count(), 1);
    h.advance(1);
    assert_eq!(h.server.allocation_count(), 0);
    assert_eq!(h.server.stats().allocations_expired, 1);
    assert!(h.binder.bound.is_empty(), "relay socket released");
    // Lifetimes above the maximum are capped.
    alice.nonce = None;
    let response = alice.allocate(&mut h, &[Attribute::Lifetime(100_000)]);
    assert_eq!(Message::parse(&response).unwrap().lifetime(), Some(3600));
}

#[test]
fn tcp_connection_close_deletes_the_allocation() {
    let mut h = Harness::new();
    let mut alice = Client::new("192.0.2.1:5555", "alice", "wonderland");
    alice.five_tuple.transport = Transport::Tcp;
    alice.allocate(&mut h, &[]);
    let peer: SocketAddr = PEER.parse().unwrap();
    alice.call(
        &mut h,
        Method::CHANNEL_BIND,
        &[
            Attribute::ChannelNumber(0x4000),
            Attribute::XorPeerAddress(peer),
        ],
    );
    let relay = bound_relay(&h, &alice);
    // Stream transports pad ChannelData to 4 bytes (RFC 8656 §12.5).
    assert_eq!(
        client_payload(h.peer_sends(relay, PEER, b"abcde")).len(),
        12
    );
    h.server.client_closed(alice.five_tuple);
    h.drain(&[]);
    assert_eq!(h.server.allocation_count(), 0);
    assert!(h.binder.bound.is_empty());
}

#[test]
fn unknown_comprehension_required_attribute_is_420() {
    let mut h = Harness::new();
    let ft = five_tuple("192.0.2.1:5555");
    let mut b = MessageBuilder::new(Class::Request, Method::BINDING, TransactionId([4; 12]));
    // Large enough that the answer is no larger than the request (no amplification).
    b.add(&Attribute::Unknown {
        kind: 0x7777,
        value: &[0; 40],
    });
    let response = client_payload(h.input(ft, &b.finish()));
    let message = Message::parse(&response).unwrap();
    assert_eq!(message.error_code().unwrap().0, 420);
    assert!(
        message
            .attributes()
            .any(|a| *a == Attribute::UnknownAttributes(vec![0x7777]))
    );
}

#[test]
fn unauthenticated_requests_are_rate_limited_per_source() {
    let mut cfg = config();
    cfg.unauthenticated_limit = RateLimit {
        per_second: 1.0,
        burst: 5.0,
    };
    let mut h = Harness::with(cfg);
    let flooder = five_tuple("192.0.2.66:1");
    let request =
        MessageBuilder::new(Class::Request, Method::BINDING, TransactionId([5; 12])).finish();
    let answered = (0..50)
        .filter(|_| h.input(flooder, &request).is_some())
        .count();
    assert_eq!(answered, 5);
    assert_eq!(h.server.stats().rate_limited, 45);
    assert!(h.input(five_tuple("192.0.2.67:1"), &request).is_some());
    h.advance(2);
    assert!(h.input(flooder, &request).is_some());
}

#[test]
fn malformed_corpus_never_panics_nor_amplifies() {
    use rand::Rng;
    let mut h = Harness::new();
    let mut alice = Client::new("192.0.2.1:5555", "alice", "wonderland");
    alice.allocate(&mut h, &[]);
    let valid = alice.build(
        TransactionId([8; 12]),
        Method::CREATE_PERMISSION,
        &[Attribute::XorPeerAddress(PEER.parse().unwrap())],
    );
    let mut corpus: Vec<Vec<u8>> = Vec::new();
    for len in 0..valid.len() {
        corpus.push(valid[..len].to_vec());
    }
    let mut rng = StdRng::seed_from_u64(99);
    for _ in 0..5000 {
        let mut m = valid.clone();
        for _ in 0..rng.gen_range(1..6) {
            let i = rng.gen_range(0..m.len());
            m[i] = rng.r#gen();
        }
        corpus.push(m);
        let len = rng.gen_range(0..200);
        corpus.push((0..len).map(|_| rng.r#gen()).collect());
    }
    // Header claims more than is there; attribute floods; ChannelData lies about its length.
    let mut lying = valid.clone();
    lying[2] = 0xff;
    corpus.push(lying);
    let mut flood = MessageBuilder::new(Class::Request, Method::ALLOCATE, TransactionId([6; 12]));
    for _ in 0..500 {
        flood.add(&Attribute::Software("x"));
    }
    corpus.push(flood.finish());
    corpus.push(vec![0x40, 0x00, 0xff, 0xff, 1, 2, 3]);
    corpus.push(vec![0x40, 0x00]);
    for (i, datagram) in corpus.iter().enumerate() {
        let ft = five_tuple(&format!("192.0.2.{}:{}", 1 + i % 200, 1000 + i % 50));
        if let Some(Transmit::ToClient {
            payload: Payload::Message(payload),
            ..
        }) = h.input(ft, datagram)
        {
            let is_valid_request =
                Message::parse(datagram).is_ok_and(|m| m.class == Class::Request);
            assert!(
                is_valid_request || payload.len() <= datagram.len(),
                "response of {} bytes to {} malformed bytes",
                payload.len(),
                datagram.len()
            );
        }
    }
    assert!(h.server.stats().malformed_dropped > 0);
}

#[test]
fn fast_path_is_told_of_channels_until_they_or_their_allocation_end() {
    use crate::allocation::FastPathEvent;
    let mut h = Harness::new();
    let mut alice = Client::new("192.0.2.1:5555", "alice", "wonderland");
    alice.allocate(&mut h, &[]);
    let peer: SocketAddr = PEER.parse().unwrap();
    let bind = [
        Attribute::ChannelNumber(0x4000),
        Attribute::XorPeerAddress(peer),
    ];
    alice.call(&mut h, Method::CHANNEL_BIND, &bind);
    let events = h.take_fast_path_events();
    let [FastPathEvent::Up(up)] = events[..] else {
        panic!("{events:?}")
    };
    assert_eq!(
        (up.channel, up.peer, up.five_tuple),
        (0x4000, peer, alice.five_tuple)
    );
    assert_eq!(up.relay, bound_relay(&h, &alice));
    assert_eq!(up.expires, h.now + Duration::from_secs(300));
    // The permission lapses: the kernel entry is withdrawn with it.
    h.advance(300);
    assert!(matches!(
        h.take_fast_path_events()[..],
        [FastPathEvent::Down(_)]
    ));
    alice.nonce = None;
    alice.call(
        &mut h,
        Method::CREATE_PERMISSION,
        &[Attribute::XorPeerAddress(peer)],
    );
    assert!(matches!(
        h.take_fast_path_events()[..],
        [FastPathEvent::Up(_)]
    ));
    alice.call(&mut h, Method::REFRESH, &[Attribute::Lifetime(0)]);
    assert!(matches!(
        h.take_fast_path_events()[..],
        [FastPathEvent::Down(_)]
    ));
}

#[test]
fn revoking_a_user_ends_their_allocations_and_refuses_old_credentials() {
    let mut h = Harness::new();
    let expiry = UNIX_T0 + 3600;
    let username = format!("{expiry}:carol");
    let password = rest_password(b"current", &username);
    let mut carol = Client::new("192.0.2.1:4000", &username, &password);
    let mut bob = Client::new("192.0.2.2:4000", "bob", "builder");
    carol.allocate(&mut h, &[]);
    bob.allocate(&mut h, &[]);
    let peer: SocketAddr = PEER.parse().unwrap();
    carol.call(
        &mut h,
        Method::CHANNEL_BIND,
        &[
            Attribute::ChannelNumber(0x4000),
            Attribute::XorPeerAddress(peer),
        ],
    );
    h.take_fast_path_events();
    let ended = h.server.revoke_user("carol", UNIX_T0 + 3600, h.now);
    h.drain(&[]);
    assert_eq!(ended, 1);
    assert_eq!(h.server.allocation_count(), 1, "bob keeps his");
    assert!(matches!(
        h.take_fast_path_events()[..],
        [FastPathEvent::Down(_)]
    ));
    // Authentication comes first: the revoked credential gets 401, on any 5-tuple.
    assert_eq!(code(&carol.call(&mut h, Method::REFRESH, &[])), Some(401));
    carol.five_tuple.client = "192.0.2.1:4001".parse().unwrap();
    assert_eq!(
        code(&carol.allocate(&mut h, &[])),
        Some(401),
        "old credential refused"
    );
    let fresh = format!("{}:carol", UNIX_T0 + 3601);
    let password = rest_password(b"current", &fresh);
    let mut again = Client::new("192.0.2.1:4002", &fresh, &password);
    assert_eq!(
        code(&again.allocate(&mut h, &[])),
        None,
        "a credential minted later works"
    );
}

#[test]
fn control_plane_policy_changes_which_peers_are_allowed() {
    let mut h = Harness::new();
    let mut alice = Client::new("192.0.2.1:5555", "alice", "wonderland");
    alice.allocate(&mut h, &[]);
    let internal = [Attribute::XorPeerAddress("10.1.1.1:7000".parse().unwrap())];
    assert_eq!(
        code(&alice.call(&mut h, Method::CREATE_PERMISSION, &internal)),
        Some(403)
    );
    h.server
        .set_allowed_peer_networks(vec!["10.0.0.0/8".parse().unwrap()], h.now);
    assert_eq!(
        code(&alice.call(&mut h, Method::CREATE_PERMISSION, &internal)),
        None
    );
    h.server.set_allowed_peer_networks(vec![], h.now);
    assert_eq!(
        code(&alice.call(&mut h, Method::CREATE_PERMISSION, &internal)),
        Some(403)
    );
}

#[test]
fn control_plane_policy_adds_to_the_configured_networks() {
    let mut cfg = config();
    cfg.peer_policy = PeerPolicy::new(
        vec!["10.0.0.0/8".parse().unwrap()],
        vec![],
        vec![RELAY_V4.parse().unwrap()],
        vec![SERVER.parse().unwrap()],
        Some((50000, 50099)),
    );
    let mut h = Harness::with(cfg);
    let mut alice = Client::new("192.0.2.1:5555", "alice", "wonderland");
    alice.allocate(&mut h, &[]);
    h.server
        .set_allowed_peer_networks(vec!["172.16.0.0/12".parse().unwrap()], h.now);
    for peer in ["10.1.1.1:7000", "172.16.1.1:7000"] {
        let permission = [Attribute::XorPeerAddress(peer.parse().unwrap())];
        let response = alice.call(&mut h, Method::CREATE_PERMISSION, &permission);
        assert_eq!(code(&response), None, "{peer}");
    }
}

#[test]
fn each_allocation_counts_what_it_relayed_including_what_the_kernel_forwarded() {
    let mut h = Harness::new();
    let mut alice = Client::new("192.0.2.1:5555", "alice", "wonderland");
    alice.allocate(&mut h, &[Attribute::Lifetime(3600)]);
    let relay = bound_relay(&h, &alice);
    let peer: SocketAddr = PEER.parse().unwrap();
    let permission = [Attribute::XorPeerAddress(peer)];
    alice.call(&mut h, Method::CREATE_PERMISSION, &permission);
    let mut b = MessageBuilder::new(Class::Indication, Method::SEND, TransactionId([3; 12]));
    b.add(&Attribute::XorPeerAddress(peer))
        .add(&Attribute::Data(b"hello"));
    assert!(h.input(alice.five_tuple, &b.finish()).is_some());
    assert!(h.peer_sends(relay, PEER, b"hi back").is_some());
    // Refused traffic is not the allocation's.
    assert_eq!(h.peer_sends(relay, "8.8.4.4:9000", b"stranger"), None);

    let relayed = |h: &Harness| h.server.allocation(&alice.five_tuple).unwrap().relayed;
    assert_eq!(
        relayed(&h),
        RelayedBytes {
            from_client: 5,
            to_client: 7
        }
    );
    h.server.credit_fast_path(
        &alice.five_tuple,
        RelayedBytes {
            from_client: 1000,
            to_client: 2000,
        },
        RelayedBytes {
            from_client: 30,
            to_client: 40,
        },
    );
    assert_eq!(
        relayed(&h),
        RelayedBytes {
            from_client: 1005,
            to_client: 2007
        }
    );
    assert_eq!(
        h.server.allocation(&alice.five_tuple).unwrap().over_limit,
        RelayedBytes {
            from_client: 30,
            to_client: 40
        }
    );
    // Credit for an allocation that is gone goes nowhere.
    h.server.credit_fast_path(
        &five_tuple("192.0.2.9:1"),
        RelayedBytes::default(),
        RelayedBytes::default(),
    );
    let listed: Vec<_> = h.server.allocations().map(|a| &*a.username).collect();
    assert_eq!(listed, ["alice"]);
    assert_eq!(
        h.server.unix_time(h.now + Duration::from_secs(3600)),
        UNIX_T0 + 3600
    );
}

#[path = "tcp_relay_tests.rs"]
mod tcp_relay;

#[path = "consent_tests.rs"]
mod consent;

#[test]
fn a_bandwidth_policy_changes_live_allocations_by_user_and_their_channels_in_the_kernel() {
    use crate::allocation::FastPathChannel;
    use crate::bandwidth::{BandwidthLimit, BandwidthPolicy};
    let limit = |bits_per_second| BandwidthLimit::with_default_burst(bits_per_second);
    let mut config = config();
    config.bandwidth.default = Some(limit(2_000_000));
    let mut h = Harness::with(config);
    let mut alice = Client::new("192.0.2.1:5555", "alice", "wonderland");
    let mut bob = Client::new("192.0.2.2:5555", "bob", "builder");
    for client in [&mut alice, &mut bob] {
        client.allocate(&mut h, &[]);
        client.call(
            &mut h,
            Method::CHANNEL_BIND,
            &[
                Attribute::ChannelNumber(0x4001),
                Attribute::XorPeerAddress(PEER.parse().unwrap()),
            ],
        );
    }
    h.take_fast_path_events();
    let limit_of =
        |h: &Harness, client: &Client| h.server.allocation(&client.five_tuple).unwrap().bandwidth;

    // Alice at 64 kbit/s, Bob unlimited, the others at the default: both change at once, and
    // each one's channel goes to the kernel again with its new limit.
    let policy = BandwidthPolicy {
        default: Some(limit(2_000_000)),
        users: [
            ("alice".to_owned(), Some(limit(64_000))),
            ("bob".to_owned(), None),
        ]
        .into_iter()
        .collect(),
    };
    h.server.set_bandwidth_policy(policy.clone(), h.now);
    h.drain(&[]);
    assert_eq!(limit_of(&h, &alice), Some(limit(64_000)));
    assert_eq!(limit_of(&h, &bob), None);
    let mut events: Vec<_> = h
        .take_fast_path_events()
        .into_iter()
        .map(|event| match event {
            FastPathEvent::Up(FastPathChannel {
                five_tuple,
                bandwidth,
                ..
            }) => (five_tuple.client, bandwidth),
            other => panic!("{other:?}"),
        })
        .collect();
    events.sort_by_key(|(client, _)| *client);
    assert_eq!(
        events,
        [
            (alice.five_tuple.client, Some(limit(64_000))),
            (bob.five_tuple.client, None)
        ]
    );

    // The same policy again changes nothing; a new allocation takes its user's limit.
    h.server.set_bandwidth_policy(policy, h.now);
    h.drain(&[]);
    assert!(h.take_fast_path_events().is_empty());
    let mut alice_again = Client::new("192.0.2.3:5555", "alice", "wonderland");
    alice_again.allocate(&mut h, &[]);
    assert_eq!(limit_of(&h, &alice_again), Some(limit(64_000)));
}

#[test]
fn an_allocation_over_its_bandwidth_limit_drops_and_counts_and_takes_its_limit_to_the_kernel() {
    let mut config = config();
    // 80 kbit/s: 10 000 bytes a second, with a 1500-byte burst.
    let config_limit = || crate::bandwidth::BandwidthLimit {
        bits_per_second: 80_000,
        burst_bytes: 1500,
    };
    config.bandwidth.default = Some(config_limit());
    let mut h = Harness::with(config);
    let mut alice = Client::new("192.0.2.1:5555", "alice", "wonderland");
    alice.allocate(&mut h, &[]);
    let peer: SocketAddr = PEER.parse().unwrap();
    alice.call(
        &mut h,
        Method::CHANNEL_BIND,
        &[
            Attribute::ChannelNumber(0x4001),
            Attribute::XorPeerAddress(peer),
        ],
    );
    let limit = config_limit();
    assert!(
        matches!(
            h.take_fast_path_events()[..],
            [FastPathEvent::Up(crate::allocation::FastPathChannel { bandwidth: Some(l), .. })] if l == limit
        ),
        "the channel goes to the kernel with the allocation's limit"
    );
    // 1000-byte datagrams both ways, 10 a second apart by 10 ms: ten times the limit.
    let data = vec![7u8; 1000];
    let relay = bound_relay(&h, &alice);
    let (mut out, mut back) = (0, 0);
    for _ in 0..500 {
        let frame = encode_channel_data(0x4001, &data, false);
        if h.input(alice.five_tuple, &frame).is_some() {
            out += 1;
        }
        if h.peer_sends(relay, PEER, &data).is_some() {
            back += 1;
        }
        h.now += Duration::from_millis(10);
    }
    // 5 s at 10 000 bytes a second: 50 datagrams and the burst's one, each way.
    assert!((50..=52).contains(&out), "{out} datagrams out");
    assert!((50..=52).contains(&back), "{back} datagrams back");
    let allocation = h.server.allocation(&alice.five_tuple).unwrap();
    assert_eq!(allocation.over_limit.from_client, (500 - out) * 1000);
    assert_eq!(h.server.stats().bandwidth_dropped, 1000 - out - back);
}
