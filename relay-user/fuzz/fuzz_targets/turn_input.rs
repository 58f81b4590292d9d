//! The TURN core on arbitrary bytes, as a client and as a peer would send them.
//!
//! - `stun::Message::parse` must not panic, and every accessor of a message it accepts must
//!   answer; what it accepts, re-encoded attribute by attribute, must parse again.
//! - ChannelData parsing and the stream framer must not panic or loop.
//! - A server with a real allocation, a permission and a channel (made through its own
//!   signalling first) takes the bytes as a UDP datagram, as a TCP stream of frames and as a
//!   peer's datagram on the relay: no panic, and nothing relayed to or from a peer without a
//!   permission.
//!
//! Seeds: `corpus/turn_input` (a Binding request, an unsigned Allocate, ChannelData, a Send
//! indication). Run with `cargo xtask test`, or by hand:
//! `cargo +nightly fuzz run turn_input -- -max_total_time=60` in `relay-user`.

#![no_main]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use rampart_rate_limit::RateLimit;
use rampart_turn::auth::Credentials;
use rampart_turn::channel_data::{ChannelData, next_stream_frame};
use rampart_turn::peer_policy::PeerPolicy;
use rampart_turn::server::{Output, PEER_HEADROOM, PEER_TAILROOM, Payload};
use rampart_turn::stun::{Attribute, Class, Message, MessageBuilder, Method, TransactionId};
use rampart_turn::{
    FiveTuple, RelayAddress, Server, ServerConfig, SharedState, Transmit, Transport,
};
use rand::SeedableRng;
use rand::rngs::StdRng;

const REALM: &str = "rampart.test";
const PEER: &str = "8.8.8.8:9000";

fuzz_target!(|data: &[u8]| {
    codec(data);
    let now = Instant::now();
    let (mut server, relay) = server_with_a_channel(now);
    let udp = five_tuple(Transport::Udp, 1);
    server.handle_client_input(udp, data, now);
    check(&mut server, now);

    let tcp = five_tuple(Transport::Tcp, 2);
    let mut rest = data;
    for _ in 0..=data.len() {
        match next_stream_frame(rest) {
            Ok(Some(len)) if len > 0 && len <= rest.len() => {
                server.handle_client_input(tcp, &rest[..len], now);
                check(&mut server, now);
                rest = &rest[len..];
            }
            _ => break,
        }
    }

    let mut buf = vec![0u8; PEER_HEADROOM + data.len() + PEER_TAILROOM];
    buf[PEER_HEADROOM..PEER_HEADROOM + data.len()].copy_from_slice(data);
    server.handle_peer_input(relay, PEER.parse().unwrap(), &mut buf, data.len(), now);
    check(&mut server, now);
    server.handle_peer_input(
        relay,
        "8.8.4.4:1".parse().unwrap(),
        &mut buf,
        data.len(),
        now,
    );
    assert!(
        server.poll_output().is_none(),
        "relayed from a peer without a permission"
    );
});

fn codec(data: &[u8]) {
    let _ = ChannelData::parse(data);
    let Ok(message) = Message::parse(data) else {
        return;
    };
    let _ = (
        message.username(),
        message.realm(),
        message.nonce(),
        message.lifetime(),
        message.requested_transport(),
        message.requested_address_family(),
        message.additional_address_family(),
        message.even_port(),
        message.reservation_token(),
        message.dont_fragment(),
        message.channel_number(),
        message.data(),
        message.error_code(),
        message.password_algorithm(),
        message.password_algorithms(),
        message.xor_mapped_address(),
        message.unknown_comprehension_required(),
        message.integrity_kind(),
        message.verify_integrity(b"key"),
    );
    let _ = message.xor_peer_addresses().count() + message.xor_relayed_addresses().count();
    let mut b = MessageBuilder::new(message.class, message.method, message.transaction_id);
    for attribute in message.attributes() {
        if !matches!(
            attribute,
            Attribute::MessageIntegrity(_)
                | Attribute::MessageIntegritySha256(_)
                | Attribute::Fingerprint(_)
        ) {
            b.add(attribute);
        }
    }
    let again = b.finish();
    if let Err(error) = Message::parse(&again) {
        panic!("a re-encoded message does not parse: {error:?}");
    }
}

fn five_tuple(transport: Transport, host: u8) -> FiveTuple {
    FiveTuple {
        transport,
        client: SocketAddr::new([192, 0, 2, host].into(), 4000),
        server: "198.51.7.1:3478".parse().unwrap(),
    }
}

/// Everything the server asked for is done; what it sent is checked.
fn check(server: &mut Server, now: Instant) {
    while let Some(output) = server.poll_output() {
        match output {
            Output::BindRelay { relay, .. } | Output::ListenRelay { relay } => {
                server.handle_bind_result(relay, true, now)
            }
            Output::ConnectPeer { id, .. } => {
                server.handle_connect_result(id, true, now);
            }
            Output::Transmit(Transmit::ToPeer { peer, .. }) => {
                // Permissions are by IP address (RFC 8656 §9): any port of the peer's.
                let permitted: SocketAddr = PEER.parse().unwrap();
                assert_eq!(
                    peer.ip(),
                    permitted.ip(),
                    "relayed to a peer without a permission"
                );
            }
            _ => {}
        }
    }
}

/// A server where 192.0.2.1 (UDP) holds an allocation with channel 0x4000 to [`PEER`].
fn server_with_a_channel(now: Instant) -> (Server, SocketAddr) {
    let relay_ip = "198.51.7.1".parse().unwrap();
    let config = ServerConfig {
        realm: REALM.into(),
        software: None,
        relay_v4: Some(RelayAddress {
            bind: relay_ip,
            advertised: relay_ip,
        }),
        relay_v6: None,
        port_range: (50000, 50009),
        default_lifetime: Duration::from_secs(600),
        max_lifetime: Duration::from_secs(3600),
        nonce_lifetime: Duration::from_secs(600),
        allocations_per_user: 4,
        allocations_total: 8,
        unauthenticated_limit: RateLimit {
            per_second: 1e6,
            burst: 1e6,
        },
        credentials: Credentials::new([("alice".into(), "wonderland".into())].into(), None),
        peer_connections_per_allocation: 8,
        consent: rampart_turn::server::Consent::Off,
        listener_sides: vec![],
        bandwidth: Default::default(),
        peer_policy: PeerPolicy::new(vec![], vec![], vec![relay_ip], vec![], Some((50000, 50009))),
    };
    let shared = Arc::new(SharedState::for_config(&config, [1; 32]));
    let mut server = Server::new(
        config,
        shared,
        StdRng::seed_from_u64(1),
        now,
        Duration::from_secs(1_800_000_000),
    );
    let client = five_tuple(Transport::Udp, 1);
    let mut nonce: Option<String> = None;
    let requests: [(Method, Vec<Attribute<'static>>); 3] = [
        (Method::ALLOCATE, vec![Attribute::RequestedTransport(17)]),
        (Method::ALLOCATE, vec![Attribute::RequestedTransport(17)]),
        (
            Method::CHANNEL_BIND,
            vec![
                Attribute::ChannelNumber(0x4000),
                Attribute::XorPeerAddress(PEER.parse().unwrap()),
            ],
        ),
    ];
    for (tid, (method, attributes)) in requests.iter().enumerate() {
        let mut b = MessageBuilder::new(Class::Request, *method, TransactionId([tid as u8; 12]));
        for attribute in attributes {
            b.add(attribute);
        }
        if let Some(nonce) = &nonce {
            b.sign_long_term("alice", REALM, nonce, "wonderland");
        }
        server.handle_client_input(client, &b.finish(), now);
        while let Some(output) = server.poll_output() {
            match output {
                Output::BindRelay { relay, .. } | Output::ListenRelay { relay } => {
                    server.handle_bind_result(relay, true, now)
                }
                Output::Transmit(Transmit::ToClient {
                    payload: Payload::Message(m),
                    ..
                }) => {
                    if let Some(n) = Message::parse(&m)
                        .ok()
                        .and_then(|m| m.nonce().map(str::to_owned))
                    {
                        nonce = Some(n);
                    }
                }
                _ => {}
            }
        }
    }
    let relay = server.allocation(&client).expect("allocated").relays[0].bound;
    (server, relay)
}
