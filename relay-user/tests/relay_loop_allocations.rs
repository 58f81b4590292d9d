//! The whole agent, not only its core, relays without heap allocations in steady state: a
//! real UDP client and peer on loopback, one allocation with a channel, thousands of
//! datagrams both ways through a relay loop (recvmmsg, the core, sendmmsg), and the
//! process-wide count of heap allocations taken around them (every thread: the relay loop,
//! tokio's, this one) does not grow with the number of datagrams. Then the same over TCP:
//! frames read by the connection's tokio task, relayed by the loop, written back by the task.

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rampart::config::Config;
use rampart::server::Edge;
use rampart_turn::Transport;
use rampart_turn::channel_data::encode_channel_data;
use rampart_turn::stun::{Attribute, Class, Message, MessageBuilder, Method, TransactionId};
use tokio_util::sync::CancellationToken;

struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

// SAFETY: every call is passed through to the system allocator unchanged.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller's contract is the system allocator's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const USER: &str = "alice";
const PASSWORD: &str = "wonderland";
const CHANNEL: u16 = 0x4000;
/// Round trips (client -> peer -> client) per measured run.
const ROUND_TRIPS: u64 = 2000;

#[test]
fn relaying_allocates_nothing_per_datagram_or_frame() {
    // A port free a moment ago (listeners need a fixed one).
    let port = UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .unwrap()
        .port();
    let config = Config::parse(
        &format!(
            r#"
realm = "example.org"
[[listen]]
transport = "udp"
address = "127.0.0.1:{port}"
[[listen]]
transport = "tcp"
address = "127.0.0.1:{port}"
[relay]
ipv4 = "127.0.0.1"
port_min = 47000
port_max = 47999
allowed_peer_networks = ["127.0.0.0/8"]
consent = "off"
loops = 1
steering = false
[auth]
users = {{ {USER} = "{PASSWORD}" }}
"#
        ),
        Path::new("."),
    )
    .expect("configuration");
    let (server_tx, server_rx) = std::sync::mpsc::channel();
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    let agent = std::thread::spawn(move || {
        let runtime = tokio::runtime::Runtime::new().expect("runtime");
        runtime.block_on(async move {
            // Counters once an hour: none during the test.
            let edge = Edge::start(config, Duration::from_secs(3600))
                .await
                .expect("start the edge");
            let listener = |wanted| {
                edge.local_addresses()
                    .iter()
                    .find(|(transport, _)| *transport == wanted)
                    .map(|(_, address)| *address)
                    .expect("a listener of each transport")
            };
            let servers = (listener(Transport::Udp), listener(Transport::Tcp));
            server_tx.send(servers).expect("the test waits");
            edge.run(stop).await;
        });
    });
    let (udp_server, tcp_server) = server_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the edge started");
    // Not the edge's own address (127.0.0.1): the peer policy refuses that.
    let peer = UdpSocket::bind("127.0.0.2:0").unwrap();
    peer.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let peer_addr = peer.local_addr().unwrap();
    let to_peer = encode_channel_data(CHANNEL, &[0x55; 160], false);
    let to_client = [0xAA; 160];
    // The heap allocations of the whole process over ROUND_TRIPS round trips (client ->
    // peer -> client, `send` then `receive` on the client's side), counted after as many
    // to warm up (buffers, queues and maps reach their steady sizes).
    let measure = |send: &mut dyn FnMut(), receive: &mut dyn FnMut() -> usize| {
        let mut run = || {
            let mut buf = [0u8; 2048];
            for _ in 0..ROUND_TRIPS {
                send();
                let (len, relayed) = peer.recv_from(&mut buf).expect("the peer gets it");
                assert_eq!(len, 160);
                peer.send_to(&to_client, relayed).unwrap();
                assert_eq!(receive(), 164, "the client gets a ChannelData message");
            }
        };
        run();
        let before = ALLOCATIONS.load(Ordering::Relaxed);
        run();
        ALLOCATIONS.load(Ordering::Relaxed) - before
    };

    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    udp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 2048];
    allocate_with_channel(
        |request| {
            udp.send_to(request, udp_server).unwrap();
            let (len, _) = udp.recv_from(&mut buf).expect("a response");
            buf[..len].to_vec()
        },
        peer_addr,
    );
    let over_udp = measure(
        &mut || {
            udp.send_to(&to_peer, udp_server).unwrap();
        },
        &mut || udp.recv_from(&mut buf).expect("the client gets it").0,
    );

    // RFC 8656 §12.5: over TCP, ChannelData is padded to 4 bytes; 4 + 160 already is.
    let mut tcp = TcpStream::connect(tcp_server).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    tcp.set_nodelay(true).unwrap();
    allocate_with_channel(
        |request| {
            tcp.write_all(request).unwrap();
            let mut header = [0u8; 20];
            tcp.read_exact(&mut header).expect("a response");
            let mut response = header.to_vec();
            response.resize(
                20 + usize::from(u16::from_be_bytes([header[2], header[3]])),
                0,
            );
            tcp.read_exact(&mut response[20..]).expect("a response");
            response
        },
        peer_addr,
    );
    let tcp = std::cell::RefCell::new(tcp);
    let over_tcp = measure(
        &mut || tcp.borrow_mut().write_all(&to_peer).unwrap(),
        &mut || {
            let mut frame = [0u8; 164];
            tcp.borrow_mut()
                .read_exact(&mut frame)
                .expect("the client gets it");
            frame.len()
        },
    );

    shutdown.cancel();
    agent.join().expect("the agent thread");
    // Anything per datagram would be thousands (2 x ROUND_TRIPS datagrams relayed each way);
    // the few allowed are the runtime's own (a timer tick of the agent's tokio side, a block
    // of a tokio channel).
    assert!(
        over_udp < 20 && over_tcp < 20,
        "{over_udp} heap allocations while relaying {n} datagrams over UDP, {over_tcp} while \
         relaying {n} over TCP",
        n = 2 * ROUND_TRIPS
    );
}

/// Allocate (after the 401 challenge) and bind `CHANNEL` to `peer`, each request through
/// `transact`.
fn allocate_with_channel(mut transact: impl FnMut(&[u8]) -> Vec<u8>, peer: SocketAddr) {
    let tid = |n: u8| TransactionId([n; 12]);
    let allocate = |n: u8| {
        let mut b = MessageBuilder::new(Class::Request, Method::ALLOCATE, tid(n));
        b.add(&Attribute::RequestedTransport(17));
        b
    };
    let challenge = transact(&allocate(1).finish());
    let challenge = Message::parse(&challenge).expect("STUN");
    let (realm, nonce) = (
        challenge.realm().expect("REALM").to_owned(),
        challenge.nonce().expect("NONCE").to_owned(),
    );
    let mut signed = allocate(2);
    signed.sign_long_term(USER, &realm, &nonce, PASSWORD);
    let response = transact(&signed.finish());
    let response = Message::parse(&response).expect("STUN");
    assert_eq!(response.error_code(), None, "Allocate succeeds");
    let mut bind = MessageBuilder::new(Class::Request, Method::CHANNEL_BIND, tid(3));
    bind.add(&Attribute::ChannelNumber(CHANNEL))
        .add(&Attribute::XorPeerAddress(peer));
    bind.sign_long_term(USER, &realm, &nonce, PASSWORD);
    let response = transact(&bind.finish());
    let response = Message::parse(&response).expect("STUN");
    assert_eq!(response.error_code(), None, "ChannelBind succeeds");
}
