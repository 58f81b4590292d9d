//! The data path allocates nothing in steady state: once an allocation has its permissions and
//! a channel, relaying ChannelData and Send indications to peers, and peers' datagrams back as
//! ChannelData or Data indications, takes no heap allocation in the core, counted by the
//! global allocator on this thread.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::SeedableRng;
use rand::rngs::StdRng;

use rampart_rate_limit::RateLimit;
use rampart_turn::auth::Credentials;
use rampart_turn::channel_data::encode_channel_data;
use rampart_turn::peer_policy::PeerPolicy;
use rampart_turn::server::{Output, PEER_HEADROOM, PEER_TAILROOM, Payload};
use rampart_turn::stun::{Attribute, Class, Message, MessageBuilder, Method, TransactionId};
use rampart_turn::{
    FiveTuple, RelayAddress, Server, ServerConfig, SharedState, Transmit, Transport,
};

struct Counting;

thread_local! {
    static COUNTING: Cell<bool> = const { Cell::new(false) };
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

// SAFETY: every call is passed through to the system allocator unchanged.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if COUNTING.with(Cell::get) {
            ALLOCATIONS.with(|n| n.set(n.get() + 1));
        }
        // SAFETY: the caller's contract is the system allocator's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if COUNTING.with(Cell::get) {
            ALLOCATIONS.with(|n| n.set(n.get() + 1));
        }
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Heap allocations made on this thread while `f` runs.
fn allocations_during(f: impl FnOnce()) -> u64 {
    ALLOCATIONS.with(|n| n.set(0));
    COUNTING.with(|c| c.set(true));
    f();
    COUNTING.with(|c| c.set(false));
    ALLOCATIONS.with(Cell::get)
}

const REALM: &str = "rampart.test";
const CHANNEL: u16 = 0x4001;

#[allow(clippy::disallowed_methods)] // the test's origin of time; its value never matters
fn origin() -> Instant {
    Instant::now()
}

fn server(now: Instant) -> Server {
    let relay = "198.51.7.1".parse().unwrap();
    let config = ServerConfig {
        realm: REALM.into(),
        software: None,
        relay_v4: Some(RelayAddress {
            bind: relay,
            advertised: relay,
        }),
        relay_v6: None,
        port_range: (50000, 50099),
        default_lifetime: Duration::from_secs(600),
        max_lifetime: Duration::from_secs(3600),
        nonce_lifetime: Duration::from_secs(600),
        allocations_per_user: 10,
        allocations_total: 100,
        unauthenticated_limit: RateLimit {
            per_second: 1e6,
            burst: 1e6,
        },
        credentials: Credentials::new([("alice".into(), "wonderland".into())].into(), None),
        peer_connections_per_allocation: 8,
        consent: rampart_turn::server::Consent::Off,
        listener_sides: vec![],
        bandwidth: Default::default(),
        peer_policy: PeerPolicy::new(vec![], vec![], vec![relay], vec![], Some((50000, 50099))),
    };
    let shared = Arc::new(SharedState::for_config(&config, [1; 32]));
    Server::new(
        config,
        shared,
        StdRng::seed_from_u64(1),
        now,
        Duration::from_secs(1_800_000_000),
    )
}

/// Carry out the outputs (binds succeed) and return the payloads' lengths; allocates nothing
/// itself.
fn drain(server: &mut Server, now: Instant) -> (usize, usize) {
    let (mut to_peer, mut to_client) = (0, 0);
    while let Some(output) = server.poll_output() {
        match output {
            Output::Transmit(Transmit::ToPeer {
                payload: Payload::InPlace(range),
                ..
            }) => to_peer += range.len(),
            Output::Transmit(Transmit::ToClient {
                payload: Payload::InPlace(range),
                ..
            }) => to_client += range.len(),
            Output::BindRelay { relay, .. } => server.handle_bind_result(relay, true, now),
            _ => {}
        }
    }
    (to_peer, to_client)
}

fn signed_request(
    method: Method,
    tid: u8,
    nonce: Option<&str>,
    attributes: &[Attribute<'_>],
) -> Vec<u8> {
    let mut b = MessageBuilder::new(Class::Request, method, TransactionId([tid; 12]));
    for attribute in attributes {
        b.add(attribute);
    }
    if let Some(nonce) = nonce {
        b.sign_long_term("alice", REALM, nonce, "wonderland");
    }
    b.finish()
}

fn last_response(server: &mut Server) -> Vec<u8> {
    let mut last = Vec::new();
    while let Some(output) = server.poll_output() {
        if let Output::Transmit(Transmit::ToClient {
            payload: Payload::Message(message),
            ..
        }) = output
        {
            last = message;
        }
    }
    last
}

#[test]
fn relaying_in_steady_state_allocates_nothing() {
    let now = origin();
    let mut server = server(now);
    let client = FiveTuple {
        transport: Transport::Udp,
        client: "192.0.2.1:4000".parse().unwrap(),
        server: "198.51.7.1:3478".parse().unwrap(),
    };
    let channel_peer: SocketAddr = "8.8.8.8:9000".parse().unwrap();
    let indication_peer: SocketAddr = "8.8.4.4:9000".parse().unwrap();

    // Signalling (allocates, as it may): challenge, Allocate, a channel and a permission.
    server.handle_client_input(client, &signed_request(Method::ALLOCATE, 1, None, &[]), now);
    let challenge = last_response(&mut server);
    let nonce = Message::parse(&challenge)
        .unwrap()
        .nonce()
        .unwrap()
        .to_owned();
    let allocate = signed_request(
        Method::ALLOCATE,
        2,
        Some(&nonce),
        &[Attribute::RequestedTransport(17)],
    );
    server.handle_client_input(client, &allocate, now);
    drain(&mut server, now);
    let relay = server.allocation(&client).expect("allocated").relays[0].bound;
    let bind = [
        Attribute::ChannelNumber(CHANNEL),
        Attribute::XorPeerAddress(channel_peer),
    ];
    server.handle_client_input(
        client,
        &signed_request(Method::CHANNEL_BIND, 3, Some(&nonce), &bind),
        now,
    );
    let permission = [Attribute::XorPeerAddress(indication_peer)];
    server.handle_client_input(
        client,
        &signed_request(Method::CREATE_PERMISSION, 4, Some(&nonce), &permission),
        now,
    );
    drain(&mut server, now);

    let channel_data = encode_channel_data(CHANNEL, &[0x55; 160], false);
    let mut send = MessageBuilder::new(Class::Indication, Method::SEND, TransactionId([5; 12]));
    send.add(&Attribute::XorPeerAddress(indication_peer))
        .add(&Attribute::Data(&[0x66; 160]));
    let send = send.finish();
    let mut peer_buf = vec![0u8; PEER_HEADROOM + 1500 + PEER_TAILROOM];
    let mut relay_packets = || {
        let mut relayed = (0, 0);
        for _ in 0..1000 {
            server.handle_client_input(client, &channel_data, now);
            server.handle_client_input(client, &send, now);
            server.handle_peer_input(relay, channel_peer, &mut peer_buf, 160, now);
            server.handle_peer_input(relay, indication_peer, &mut peer_buf, 160, now);
            let (to_peer, to_client) = drain(&mut server, now);
            relayed.0 += to_peer;
            relayed.1 += to_client;
        }
        relayed
    };
    // The first round may grow the output queue to its working size.
    relay_packets();
    let mut relayed = (0, 0);
    let allocations = allocations_during(|| relayed = relay_packets());
    assert_eq!(relayed.0, 1000 * 2 * 160, "everything reached the peers");
    assert!(
        relayed.1 >= 1000 * (4 + 160 + 20 + 12 + 4 + 160),
        "and the client"
    );
    assert_eq!(
        allocations, 0,
        "heap allocations while relaying 4000 datagrams"
    );
}
