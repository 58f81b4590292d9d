//! Internal-party consent through the harness: an external user's permission towards an
//! internal network is held (traffic dropped, nothing in the fast path) until an internal
//! party allocates from that address, then released with no new request.

use super::*;

const INTERNAL_LISTENER: &str = "10.0.0.1:3478";
const INTERNAL_HOST: &str = "10.1.1.1";

fn consent_config(consent: Consent) -> ServerConfig {
    let mut config = config();
    let relay_v4: IpAddr = RELAY_V4.parse().unwrap();
    config.peer_policy = PeerPolicy::new(
        vec!["10.0.0.0/8".parse().unwrap()],
        vec![],
        vec![relay_v4, PUBLIC_V4.parse().unwrap()],
        vec![SERVER.parse().unwrap(), INTERNAL_LISTENER.parse().unwrap()],
        Some((50000, 50099)),
    );
    config.consent = consent;
    config.listener_sides = vec![
        ListenerSide {
            transport: Transport::Udp,
            address: SERVER.parse().unwrap(),
            internal: false,
        },
        ListenerSide {
            transport: Transport::Udp,
            address: INTERNAL_LISTENER.parse().unwrap(),
            internal: true,
        },
    ];
    config
}

fn send(h: &mut Harness, client: &Client, peer: SocketAddr, data: &[u8]) -> Option<Transmit> {
    let mut send = MessageBuilder::new(Class::Indication, Method::SEND, TransactionId([5; 12]));
    send.add(&Attribute::XorPeerAddress(peer))
        .add(&Attribute::Data(data));
    h.input(client.five_tuple, &send.finish())
}

fn internal_party(address: &str) -> Client {
    let mut bob = Client::new(address, "bob", "builder");
    bob.five_tuple.server = INTERNAL_LISTENER.parse().unwrap();
    bob
}

#[test]
fn media_to_an_internal_host_waits_for_an_internal_party_there() {
    let mut h = Harness::with(consent_config(Consent::Party));
    let mut alice = Client::new("192.0.2.1:5555", "alice", "wonderland");
    alice.allocate(&mut h, &[]);
    let host: SocketAddr = format!("{INTERNAL_HOST}:9000").parse().unwrap();
    // Trickle ICE: the permission comes before the internal side has allocated. It is
    // accepted (a refusal would make the browser prune the pair), and held.
    let response = alice.call(
        &mut h,
        Method::CHANNEL_BIND,
        &[
            Attribute::ChannelNumber(0x4001),
            Attribute::XorPeerAddress(host),
        ],
    );
    assert_eq!(code(&response), None, "accepted");
    assert!(
        h.take_fast_path_events().is_empty(),
        "nothing held goes into the kernel"
    );
    assert!(send(&mut h, &alice, host, b"held").is_none());
    let relay = bound_relay(&h, &alice);
    assert!(
        h.peer_sends(relay, &host.to_string(), b"held too")
            .is_none()
    );
    assert_eq!(h.server.stats().consent_held_permissions, 1);
    assert_eq!(h.server.stats().consent_held_dropped, 2);

    // Bob allocates on the internal listener from that host: the next datagram flows, and the
    // channel goes into the fast path, with no new request from alice.
    let mut bob = internal_party(&format!("{INTERNAL_HOST}:6000"));
    let allocated = bob.allocate(&mut h, &[]);
    assert_eq!(code(&allocated), None);
    assert!(h.server.allocation(&bob.five_tuple).unwrap().internal);
    match send(&mut h, &alice, host, b"flows") {
        Some(Transmit::ToPeer { peer, payload, .. }) => {
            assert_eq!(peer, host);
            assert_eq!(payload, Payload::Message(b"flows".to_vec()));
        }
        other => panic!("expected the datagram relayed, got {other:?}"),
    }
    assert!(matches!(
        h.take_fast_path_events().as_slice(),
        [FastPathEvent::Up(channel)] if channel.peer == host
    ));
    assert_eq!(h.server.stats().consent_granted, 1);

    // Bob's allocation ends (a browser releasing what its selected pair does not use): the
    // permission keeps its consent. Another internal host without a party is held.
    bob.call(&mut h, Method::REFRESH, &[Attribute::Lifetime(0)]);
    assert!(send(&mut h, &alice, host, b"still flows").is_some());
    let other: SocketAddr = "10.1.1.2:9000".parse().unwrap();
    let permitted = alice.call(
        &mut h,
        Method::CREATE_PERMISSION,
        &[Attribute::XorPeerAddress(other)],
    );
    assert_eq!(code(&permitted), None);
    let dropped = h.server.stats().consent_held_dropped;
    assert!(send(&mut h, &alice, other, b"held").is_none());
    assert_eq!(h.server.stats().consent_held_dropped, dropped + 1);

    // Public peers and internal parties' own allocations need no consent.
    let public: SocketAddr = PEER.parse().unwrap();
    alice.call(
        &mut h,
        Method::CREATE_PERMISSION,
        &[Attribute::XorPeerAddress(public)],
    );
    assert!(send(&mut h, &alice, public, b"public").is_some());
    let mut carol = internal_party("10.1.1.3:6000");
    carol.allocate(&mut h, &[]);
    carol.call(
        &mut h,
        Method::CREATE_PERMISSION,
        &[Attribute::XorPeerAddress(other)],
    );
    assert!(send(&mut h, &carol, other, b"inside").is_some());
}

#[test]
fn consent_off_holds_nothing_and_connects_need_a_party() {
    let mut h = Harness::with(consent_config(Consent::Off));
    let mut alice = Client::new("192.0.2.1:5555", "alice", "wonderland");
    alice.allocate(&mut h, &[]);
    let host: SocketAddr = format!("{INTERNAL_HOST}:9000").parse().unwrap();
    alice.call(
        &mut h,
        Method::CREATE_PERMISSION,
        &[Attribute::XorPeerAddress(host)],
    );
    assert!(send(&mut h, &alice, host, b"flows").is_some());
    assert_eq!(h.server.stats().consent_held_permissions, 0);

    // A TCP connection cannot be held: without a party, a Connect to an internal host is 403.
    let mut h = Harness::with(consent_config(Consent::Party));
    let mut dave = Client::new("192.0.2.4:5555", "alice", "wonderland");
    dave.five_tuple.transport = Transport::Tcp;
    dave.call(
        &mut h,
        Method::ALLOCATE,
        &[Attribute::RequestedTransport(6)],
    );
    let response = dave.call(&mut h, Method::CONNECT, &[Attribute::XorPeerAddress(host)]);
    assert_eq!(code(&response), Some(403));
    assert_eq!(h.server.stats().consent_refused_connections, 1);
}

fn authorize(h: &mut Harness, pairs: &[(&str, &str, u64)]) {
    let authorizations = pairs
        .iter()
        .map(|(external, internal, lifetime)| MediaAuthorization {
            external: (*external).to_owned(),
            internal: (*internal).to_owned(),
            expires_unix: UNIX_T0 + lifetime,
        })
        .collect();
    let now = h.now;
    h.server.set_media_authorizations(authorizations, now);
    h.drain(&[]);
}

fn channel_events(h: &mut Harness) -> Vec<&'static str> {
    h.take_fast_path_events()
        .iter()
        .map(|event| match event {
            FastPathEvent::Up(_) => "up",
            FastPathEvent::Down(_) => "down",
        })
        .collect()
}

#[test]
fn authorized_mode_needs_a_front_ends_authorization_and_ends_with_it() {
    let mut h = Harness::with(consent_config(Consent::Authorized));
    let mut alice = Client::new("192.0.2.1:5555", "alice", "wonderland");
    alice.allocate(&mut h, &[]);
    let host: SocketAddr = format!("{INTERNAL_HOST}:9000").parse().unwrap();
    alice.call(
        &mut h,
        Method::CHANNEL_BIND,
        &[
            Attribute::ChannelNumber(0x4001),
            Attribute::XorPeerAddress(host),
        ],
    );
    let mut bob = internal_party(&format!("{INTERNAL_HOST}:6000"));
    bob.allocate(&mut h, &[]);
    // A party is there, but no front-end has authorized alice to reach bob.
    assert!(send(&mut h, &alice, host, b"held").is_none());
    authorize(&mut h, &[("alice", "carol", 60)]);
    assert!(send(&mut h, &alice, host, b"held").is_none());

    // Authorized: released at once, into the kernel too.
    authorize(&mut h, &[("alice", "bob", 60)]);
    assert_eq!(channel_events(&mut h), ["up"]);
    assert!(send(&mut h, &alice, host, b"flows").is_some());
    // Revoked (the set without it): held again, out of the kernel, at once.
    authorize(&mut h, &[]);
    assert_eq!(channel_events(&mut h), ["down"]);
    assert!(send(&mut h, &alice, host, b"held").is_none());
    assert_eq!(h.server.stats().consent_withdrawn, 1);

    // An authorization that expires ends the flow when it does.
    authorize(&mut h, &[("alice", "bob", 10)]);
    assert_eq!(channel_events(&mut h), ["up"]);
    h.advance(5);
    assert!(send(&mut h, &alice, host, b"flows").is_some());
    h.advance(7);
    assert_eq!(channel_events(&mut h), ["down"]);
    assert!(send(&mut h, &alice, host, b"held").is_none());

    // Revoking the consenting user takes consent back too.
    authorize(&mut h, &[("alice", "bob", 600)]);
    assert_eq!(channel_events(&mut h), ["up"]);
    let now = h.now;
    h.server.revoke_user("bob", UNIX_T0 + 600, now);
    h.drain(&[]);
    assert_eq!(channel_events(&mut h), ["down"]);
    assert!(send(&mut h, &alice, host, b"held").is_none());
}

#[test]
fn credentials_that_name_nobody_get_no_internal_access_when_authorized() {
    let mut h = Harness::with(consent_config(Consent::Authorized));
    let bare = (UNIX_T0 + 3600).to_string();
    let password = rest_password(b"current", &bare);
    let mut anonymous = Client::new("192.0.2.7:5555", &bare, &password);
    let response = anonymous.allocate(&mut h, &[]);
    assert_eq!(code(&response), None, "a bare expiry is accepted");
    let host: SocketAddr = format!("{INTERNAL_HOST}:9000").parse().unwrap();
    let permitted = anonymous.call(
        &mut h,
        Method::CREATE_PERMISSION,
        &[Attribute::XorPeerAddress(host)],
    );
    assert_eq!(code(&permitted), None, "accepted, and held");
    let mut bob = internal_party(&format!("{INTERNAL_HOST}:6000"));
    bob.allocate(&mut h, &[]);
    // Even an authorization naming the whole username does not count: it names nobody.
    authorize(&mut h, &[(&bare, "bob", 60)]);
    assert!(send(&mut h, &anonymous, host, b"held").is_none());
    assert_eq!(h.server.stats().consent_held_dropped, 1);
    // Public peers are not affected.
    let public: SocketAddr = PEER.parse().unwrap();
    anonymous.call(
        &mut h,
        Method::CREATE_PERMISSION,
        &[Attribute::XorPeerAddress(public)],
    );
    assert!(send(&mut h, &anonymous, public, b"public").is_some());
}

#[test]
fn the_listener_of_the_clients_own_transport_decides_its_side() {
    let mut config = consent_config(Consent::Party);
    // An internal UDP wildcard and an external TCP listener on the same port.
    config.listener_sides = vec![
        ListenerSide {
            transport: Transport::Udp,
            address: "0.0.0.0:3478".parse().unwrap(),
            internal: true,
        },
        ListenerSide {
            transport: Transport::Tcp,
            address: "0.0.0.0:3478".parse().unwrap(),
            internal: false,
        },
        ListenerSide {
            transport: Transport::Udp,
            address: SERVER.parse().unwrap(),
            internal: false,
        },
    ];
    let mut h = Harness::with(config);
    let mut over_tcp = Client::new("10.1.1.9:5000", "bob", "builder");
    over_tcp.five_tuple.transport = Transport::Tcp;
    over_tcp.five_tuple.server = "10.0.0.1:3478".parse().unwrap();
    over_tcp.allocate(&mut h, &[]);
    assert!(!h.server.allocation(&over_tcp.five_tuple).unwrap().internal);
    // The exact external UDP listener wins over the internal wildcard.
    let mut exact = Client::new("10.1.1.8:5000", "bob", "builder");
    exact.allocate(&mut h, &[]);
    assert!(!h.server.allocation(&exact.five_tuple).unwrap().internal);
    let mut wildcard = internal_party("10.1.1.7:5000");
    wildcard.allocate(&mut h, &[]);
    assert!(h.server.allocation(&wildcard.five_tuple).unwrap().internal);
}

#[test]
fn a_network_the_control_plane_makes_internal_needs_consent_from_then_on() {
    let mut h = Harness::with(consent_config(Consent::Party));
    let mut alice = Client::new("192.0.2.1:5555", "alice", "wonderland");
    alice.allocate(&mut h, &[]);
    // 8.8.8.8 is public: no consent needed, its channel goes into the kernel.
    let public: SocketAddr = PEER.parse().unwrap();
    let response = alice.call(
        &mut h,
        Method::CHANNEL_BIND,
        &[
            Attribute::ChannelNumber(0x4002),
            Attribute::XorPeerAddress(public),
        ],
    );
    assert_eq!(code(&response), None);
    assert!(send(&mut h, &alice, public, b"flows").is_some());
    assert_eq!(channel_events(&mut h), ["up"]);
    // The control plane lists it as internal: held at once, out of the kernel.
    let now = h.now;
    h.server
        .set_allowed_peer_networks(vec!["8.8.8.0/24".parse().unwrap()], now);
    h.drain(&[]);
    assert_eq!(channel_events(&mut h), ["down"]);
    assert!(send(&mut h, &alice, public, b"held").is_none());
    assert_eq!(h.server.stats().consent_held_dropped, 1);
}

#[test]
fn taking_consent_back_closes_tcp_connections_even_after_their_permission_expired() {
    let mut h = Harness::with(consent_config(Consent::Authorized));
    let mut bob = internal_party(&format!("{INTERNAL_HOST}:6000"));
    bob.allocate(&mut h, &[]);
    authorize(&mut h, &[("alice", "bob", 3600)]);
    let mut alice = Client::new("192.0.2.1:5555", "alice", "wonderland");
    alice.five_tuple.transport = Transport::Tcp;
    alice.call(
        &mut h,
        Method::ALLOCATE,
        &[Attribute::RequestedTransport(6)],
    );
    let host: SocketAddr = format!("{INTERNAL_HOST}:3389").parse().unwrap();
    let tid = alice.tid();
    let connect = alice.build(tid, Method::CONNECT, &[Attribute::XorPeerAddress(host)]);
    assert!(h.input(alice.five_tuple, &connect).is_none());
    let id = match h.peer_connection_outputs.pop() {
        Some(Output::ConnectPeer { id, .. }) => id,
        other => panic!("{other:?}"),
    };
    assert!(h.server.handle_connect_result(id, true, h.now));
    h.drain(&[]);
    let mut data = Client::new("192.0.2.1:5556", "alice", "wonderland");
    data.five_tuple.transport = Transport::Tcp;
    data.call(
        &mut h,
        Method::CONNECTION_BIND,
        &[Attribute::ConnectionId(id)],
    );
    assert!(matches!(
        h.peer_connection_outputs.pop(),
        Some(Output::SpliceConnection { .. })
    ));
    // Long after any permission would have expired, the revocation still ends it.
    h.advance(500);
    alice.call(&mut h, Method::REFRESH, &[Attribute::Lifetime(600)]);
    bob.call(&mut h, Method::REFRESH, &[Attribute::Lifetime(600)]);
    h.advance(400);
    assert!(
        h.peer_connection_outputs.is_empty(),
        "the connection lives on: {:?}",
        h.peer_connection_outputs
    );
    authorize(&mut h, &[]);
    assert_eq!(
        h.peer_connection_outputs.pop(),
        Some(Output::ClosePeerConnection { id })
    );
    assert_eq!(h.server.stats().consent_withdrawn, 1);
}
