//! TCP allocations (RFC 6062) through the harness: Allocate's rules, Connect, peers connecting
//! in, ConnectionBind, the 30 s timers and teardown.

use super::*;

const TCP_PEER: &str = "8.8.4.4:443";

fn tcp_client(address: &str, user: &str, password: &str) -> Client {
    let mut client = Client::new(address, user, password);
    client.five_tuple.transport = Transport::Tcp;
    client
}

fn tcp_allocate(h: &mut Harness, client: &mut Client, extra: &[Attribute<'_>]) -> Vec<u8> {
    let mut attrs = vec![Attribute::RequestedTransport(6)];
    attrs.extend_from_slice(extra);
    client.call(h, Method::ALLOCATE, &attrs)
}

fn class(response: &[u8]) -> Class {
    Message::parse(response).unwrap().class
}

fn take_outputs(h: &mut Harness) -> Vec<Output> {
    std::mem::take(&mut h.peer_connection_outputs)
}

/// Alice's TCP allocation, from 192.0.2.1:5555 over TCP.
fn alice_allocated(h: &mut Harness) -> Client {
    let mut alice = tcp_client("192.0.2.1:5555", "alice", "wonderland");
    let response = tcp_allocate(h, &mut alice, &[]);
    assert_eq!(
        class(&response),
        Class::SuccessResponse,
        "{:?}",
        code(&response)
    );
    alice
}

/// A Connect to `peer` that the shell is asked to carry out: the connection's id.
fn connect(h: &mut Harness, alice: &mut Client, peer: &str) -> ConnectionId {
    let tid = alice.tid();
    let request = alice.build(
        tid,
        Method::CONNECT,
        &[Attribute::XorPeerAddress(peer.parse().unwrap())],
    );
    assert!(
        h.input(alice.five_tuple, &request).is_none(),
        "answered once connected"
    );
    match take_outputs(h).as_slice() {
        [
            Output::ConnectPeer {
                id,
                relay,
                peer: to,
            },
        ] => {
            let relays = &h.server.allocation(&alice.five_tuple).unwrap().relays;
            assert!(
                relays
                    .iter()
                    .any(|r| r.bound == *relay && relay.is_ipv4() == to.is_ipv4()),
                "connects from the relayed address of the peer's family"
            );
            assert_eq!(*to, peer.parse::<SocketAddr>().unwrap());
            *id
        }
        other => panic!("expected one ConnectPeer, got {other:?}"),
    }
}

/// The shell's answer to a Connect: the response the client gets.
fn connected(h: &mut Harness, id: ConnectionId, up: bool) -> Vec<u8> {
    let kept = h.server.handle_connect_result(id, up, h.now);
    assert_eq!(kept, up);
    client_payload(h.at_most_one(&[]))
}

/// The connections the server asked the shell to close, in id order; nothing else was asked.
fn closed_ids(h: &mut Harness) -> Vec<ConnectionId> {
    let ids = take_outputs(h)
        .into_iter()
        .map(|output| match output {
            Output::ClosePeerConnection { id } => id,
            other => panic!("expected only closes, got {other:?}"),
        })
        .collect();
    sorted(ids)
}

fn sorted(mut ids: Vec<ConnectionId>) -> Vec<ConnectionId> {
    ids.sort_unstable();
    ids
}

fn connection_bind(h: &mut Harness, data: &mut Client, id: ConnectionId) -> Vec<u8> {
    data.call(h, Method::CONNECTION_BIND, &[Attribute::ConnectionId(id)])
}

#[test]
fn tcp_allocations_are_asked_for_over_streams_without_datagram_attributes() {
    let mut h = Harness::new();
    // RFC 6062 §5.1: over UDP, 400 (not 442: that is for a protocol other than UDP and TCP).
    let mut over_udp = Client::new("192.0.2.1:5555", "alice", "wonderland");
    assert_eq!(code(&tcp_allocate(&mut h, &mut over_udp, &[])), Some(400));
    let mut alice = tcp_client("192.0.2.1:5556", "alice", "wonderland");
    for attribute in [
        Attribute::DontFragment,
        Attribute::EvenPort { reserve: false },
        Attribute::ReservationToken([1; 8]),
    ] {
        assert_eq!(
            code(&tcp_allocate(
                &mut h,
                &mut alice,
                std::slice::from_ref(&attribute)
            )),
            Some(400),
            "{attribute:?}"
        );
    }
    let sctp = [Attribute::RequestedTransport(132)];
    assert_eq!(
        code(&alice.call(&mut h, Method::ALLOCATE, &sctp)),
        Some(442)
    );
    let response = tcp_allocate(&mut h, &mut alice, &[]);
    assert_eq!(class(&response), Class::SuccessResponse);
    let allocation = h.server.allocation(&alice.five_tuple).unwrap();
    assert!(allocation.tcp);
    assert!(h.binder.bound.contains(&allocation.relays[0].bound));
    // It relays no datagrams: no channels, Send dropped and counted.
    let peer: SocketAddr = TCP_PEER.parse().unwrap();
    let bind = alice.call(
        &mut h,
        Method::CHANNEL_BIND,
        &[
            Attribute::ChannelNumber(0x4000),
            Attribute::XorPeerAddress(peer),
        ],
    );
    assert_eq!(code(&bind), Some(403));
    alice.call(
        &mut h,
        Method::CREATE_PERMISSION,
        &[Attribute::XorPeerAddress(peer)],
    );
    let mut send = MessageBuilder::new(Class::Indication, Method::SEND, TransactionId([3; 12]));
    send.add(&Attribute::XorPeerAddress(peer))
        .add(&Attribute::Data(b"datagram"));
    assert!(h.input(alice.five_tuple, &send.finish()).is_none());
    assert_eq!(h.server.stats().wrong_transport_dropped, 1);

    // A dual allocation listens in both families.
    let mut dual = tcp_client("192.0.2.1:5560", "alice", "wonderland");
    let response = tcp_allocate(
        &mut h,
        &mut dual,
        &[Attribute::AdditionalAddressFamily(AddressFamily::V6)],
    );
    assert_eq!(relayed(&response).len(), 2, "{:?}", code(&response));
    let tid = dual.tid();
    let request = dual.build(
        tid,
        Method::CONNECT,
        &[Attribute::XorPeerAddress(PEER_V6.parse().unwrap())],
    );
    assert!(h.input(dual.five_tuple, &request).is_none());
    match take_outputs(&mut h).as_slice() {
        [Output::ConnectPeer { relay, .. }] => assert!(relay.is_ipv6()),
        other => panic!("{other:?}"),
    }
}

#[test]
fn connect_then_connection_bind_splices_the_data_connection() {
    let mut h = Harness::new();
    let mut alice = alice_allocated(&mut h);
    let id = connect(&mut h, &mut alice, TCP_PEER);
    let response = connected(&mut h, id, true);
    let message = Message::parse(&response).unwrap();
    assert_eq!(message.class, Class::SuccessResponse);
    assert_eq!(message.connection_id(), Some(id));
    let key = long_term_key(
        "alice",
        "rampart.test",
        "wonderland",
        PasswordAlgorithm::Md5,
    );
    assert!(
        message.verify_integrity(&key),
        "coturn's client refuses a Connect success without MESSAGE-INTEGRITY"
    );
    // §5.2: one connection per peer.
    let tid = alice.tid();
    let again = alice.build(
        tid,
        Method::CONNECT,
        &[Attribute::XorPeerAddress(TCP_PEER.parse().unwrap())],
    );
    assert_eq!(
        code(&client_payload(h.input(alice.five_tuple, &again))),
        Some(446)
    );

    // Another user cannot take the connection; an unknown id is a bad request.
    let mut mallory = tcp_client("192.0.2.66:4000", "bob", "builder");
    assert_eq!(code(&connection_bind(&mut h, &mut mallory, id)), Some(441));
    let mut data = tcp_client("192.0.2.1:5557", "alice", "wonderland");
    assert_eq!(code(&connection_bind(&mut h, &mut data, id ^ 1)), Some(400));
    assert!(take_outputs(&mut h).is_empty());

    let response = connection_bind(&mut h, &mut data, id);
    let message = Message::parse(&response).unwrap();
    assert_eq!(message.class, Class::SuccessResponse);
    assert!(message.verify_integrity(&key));
    assert_eq!(
        take_outputs(&mut h),
        [Output::SpliceConnection {
            id,
            client: data.five_tuple
        }]
    );
    // A connection is bound once; its bind timer no longer applies.
    let mut late = tcp_client("192.0.2.1:5558", "alice", "wonderland");
    assert_eq!(code(&connection_bind(&mut h, &mut late, id)), Some(400));
    h.advance(60);
    assert!(take_outputs(&mut h).is_empty());
    assert_eq!(h.server.stats().peer_connections_bound, 1);

    // What the shell relayed is the allocation's; the data connection closing ends it.
    h.server.credit_data_connection(
        &data.five_tuple,
        RelayedBytes {
            from_client: 10,
            to_client: 20,
        },
    );
    h.server.client_closed(data.five_tuple);
    h.drain(&[]);
    assert_eq!(take_outputs(&mut h), [Output::ClosePeerConnection { id }]);
    let allocation = h.server.allocation(&alice.five_tuple).unwrap();
    assert_eq!(allocation.relayed.to_client, 20);
    assert!(allocation.peer_connections.is_empty());
}

#[test]
fn a_failed_or_slow_connect_gets_447() {
    let mut h = Harness::new();
    let mut alice = alice_allocated(&mut h);
    let id = connect(&mut h, &mut alice, TCP_PEER);
    assert_eq!(code(&connected(&mut h, id, false)), Some(447));
    assert_eq!(take_outputs(&mut h), [Output::ClosePeerConnection { id }]);

    let id = connect(&mut h, &mut alice, TCP_PEER);
    h.now += PEER_CONNECT_TIMEOUT;
    h.server.handle_timeout(h.now);
    let response = client_payload(h.at_most_one(&[]));
    assert_eq!(code(&response), Some(447));
    assert_eq!(take_outputs(&mut h), [Output::ClosePeerConnection { id }]);
    // The shell's answer after the timeout: it closes what it connected.
    assert!(!h.server.handle_connect_result(id, true, h.now));
    assert_eq!(h.server.stats().peer_connections_failed, 2);
}

#[test]
fn peers_connecting_in_need_a_permission_and_are_announced() {
    let mut h = Harness::new();
    let mut alice = alice_allocated(&mut h);
    let relay = bound_relay(&h, &alice);
    let peer: SocketAddr = "8.8.4.4:40000".parse().unwrap();
    assert_eq!(h.server.handle_peer_connection(relay, peer, h.now), None);
    assert!(
        h.drain(&[]).is_empty(),
        "the client hears of no unpermitted peer"
    );
    alice.call(
        &mut h,
        Method::CREATE_PERMISSION,
        &[Attribute::XorPeerAddress(peer)],
    );
    let id = h
        .server
        .handle_peer_connection(relay, peer, h.now)
        .expect("accepted");
    let indication = client_payload(h.at_most_one(&[]));
    let message = Message::parse(&indication).unwrap();
    assert_eq!(
        (message.class, message.method),
        (Class::Indication, Method::CONNECTION_ATTEMPT)
    );
    assert_eq!(message.xor_peer_addresses().next(), Some(peer));
    assert_eq!(message.connection_id(), Some(id));
    assert_eq!(id >> 24, 0, "issued by shard 0");

    // §5.3: no ConnectionBind within 30 s, and the connection is closed.
    h.advance(29);
    assert!(take_outputs(&mut h).is_empty());
    h.advance(1);
    assert_eq!(take_outputs(&mut h), [Output::ClosePeerConnection { id }]);
    assert_eq!(h.server.stats().peer_connections_unbound_expired, 1);
    let mut data = tcp_client("192.0.2.1:5557", "alice", "wonderland");
    assert_eq!(code(&connection_bind(&mut h, &mut data, id)), Some(400));

    // The peer policy applies to peers connecting in as to Connect.
    let denied: SocketAddr = "10.0.0.1:40000".parse().unwrap();
    assert_eq!(h.server.handle_peer_connection(relay, denied, h.now), None);
    let tid = alice.tid();
    let request = alice.build(tid, Method::CONNECT, &[Attribute::XorPeerAddress(denied)]);
    assert_eq!(
        code(&client_payload(h.input(alice.five_tuple, &request))),
        Some(403)
    );
    let stats = h.server.stats();
    assert_eq!(
        (
            stats.peer_connections_accepted,
            stats.peer_connections_refused
        ),
        (1, 2)
    );
}

#[test]
fn peer_connections_end_with_their_allocation_and_are_capped() {
    let mut config = config();
    config.peer_connections_per_allocation = 2;
    let mut h = Harness::with(config);
    let mut alice = alice_allocated(&mut h);
    let first = connect(&mut h, &mut alice, "8.8.4.4:1");
    connected(&mut h, first, true);
    let second = connect(&mut h, &mut alice, "8.8.4.4:2");
    let tid = alice.tid();
    let third = alice.build(
        tid,
        Method::CONNECT,
        &[Attribute::XorPeerAddress("8.8.4.4:3".parse().unwrap())],
    );
    assert_eq!(
        code(&client_payload(h.input(alice.five_tuple, &third))),
        Some(508)
    );
    // The control connection closing ends the allocation and every peer connection, the one
    // still connecting included (RFC 6062 §5.5).
    h.server.client_closed(alice.five_tuple);
    h.drain(&[]);
    assert_eq!(closed_ids(&mut h), sorted(vec![first, second]));
    assert!(!h.server.handle_connect_result(second, true, h.now));
}

#[test]
fn connection_ids_carry_their_shard() {
    let now = crate::test_origin();
    let config = config();
    let mut server = Server::new(
        config.clone(),
        Arc::new(SharedState::for_config(&config, [7; 32])),
        StdRng::seed_from_u64(1),
        now,
        Duration::from_secs(UNIX_T0),
    )
    .with_connection_shard(5);
    for _ in 0..100 {
        let id = server.new_connection_id().unwrap();
        assert_eq!(connection_shard(id), 5);
    }
}

#[test]
fn a_relay_going_away_takes_its_connections_and_answers_a_pending_connect() {
    let mut h = Harness::new();
    let mut alice = tcp_client("192.0.2.1:5555", "alice", "wonderland");
    let response = tcp_allocate(
        &mut h,
        &mut alice,
        &[Attribute::AdditionalAddressFamily(AddressFamily::V6)],
    );
    assert_eq!(relayed(&response).len(), 2);
    let v4 = connect(&mut h, &mut alice, TCP_PEER);
    connected(&mut h, v4, true);
    let v6 = connect(&mut h, &mut alice, PEER_V6);
    connected(&mut h, v6, true);
    // The IPv6 relay goes (Refresh to 0 for that family): its connection with it.
    alice.call(
        &mut h,
        Method::REFRESH,
        &[
            Attribute::Lifetime(0),
            Attribute::RequestedAddressFamily(AddressFamily::V6),
        ],
    );
    assert_eq!(
        take_outputs(&mut h),
        [Output::ClosePeerConnection { id: v6 }]
    );

    // A Connect under way when the allocation ends is answered, with 447.
    let pending = connect(&mut h, &mut alice, "8.8.4.4:2");
    let tid = alice.tid();
    let delete = alice.build(tid, Method::REFRESH, &[Attribute::Lifetime(0)]);
    h.server
        .handle_client_input(alice.five_tuple, &delete, h.now);
    let answers: Vec<Option<u16>> = h
        .drain(&delete)
        .into_iter()
        .map(|t| code(&client_payload(Some(t))))
        .collect();
    assert_eq!(
        answers,
        [Some(447), None],
        "the Connect's 447, then the Refresh's success"
    );
    assert_eq!(closed_ids(&mut h), sorted(vec![v4, pending]));
}
