//! Bandwidth limits on the userspace path, on loopback: `[limits] bandwidth_per_allocation` =
//! 2 Mbit/s (burst 25 kB, its default). A client offers ten times that for 5 s, in 1000-byte
//! ChannelData messages to a UDP peer; what reaches the peer is the limit's worth within 10%
//! (the rate is printed). A flow at half the limit loses nothing.
//!
//! A limited allocation's channels are kept out of the XDP fast path (the kernel does not
//! police budgets yet), so this is the whole of what the agent enforces today.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use rampart_tests::{PASSWORD, PEER_V4, Proto, Rampart, RampartConfig, USER};
use rampart_turn::stun::AddressFamily;

const LIMIT_BITS: u64 = 2_000_000;
const BURST: u64 = LIMIT_BITS / 80;
const MESSAGE: usize = 1000;
const CHANNEL: u16 = 0x4000;

/// Sends `per_tick` messages every 10 ms for `seconds` and counts, in a thread, what the peer
/// receives until 500 ms after the last; (bytes sent, bytes received).
fn offer(
    client: &mut rampart_tests::TurnClient,
    peer: &UdpSocket,
    per_tick: usize,
    seconds: u64,
) -> (u64, u64) {
    peer.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let payload = vec![0x5a; MESSAGE];
    std::thread::scope(|scope| {
        let receiver = scope.spawn(|| {
            let mut buf = vec![0u8; 2048];
            let mut received = 0u64;
            while let Ok((n, _)) = peer.recv_from(&mut buf) {
                received += n as u64;
            }
            received
        });
        let start = Instant::now();
        let mut sent = 0u64;
        let mut tick = 0u32;
        while start.elapsed() < Duration::from_secs(seconds) {
            for _ in 0..per_tick {
                client.send_channel_data(CHANNEL, &payload).unwrap();
                sent += MESSAGE as u64;
            }
            tick += 1;
            let next = start + Duration::from_millis(10) * tick;
            std::thread::sleep(next.saturating_duration_since(Instant::now()));
        }
        (sent, receiver.join().unwrap())
    })
}

fn limited_client() -> (Rampart, rampart_tests::TurnClient, UdpSocket) {
    let config = RampartConfig::single(Proto::Udp, false)
        .with_limit("bandwidth_per_allocation", &LIMIT_BITS.to_string())
        .with_stats_interval(1);
    let server = Rampart::start(&config).unwrap();
    let mut client = server.client(Proto::Udp, false).unwrap();
    client.allocate(USER, PASSWORD, AddressFamily::V4).unwrap();
    let peer = UdpSocket::bind(SocketAddr::new(IpAddr::V4(PEER_V4), 0)).unwrap();
    client
        .channel_bind(CHANNEL, peer.local_addr().unwrap())
        .unwrap();
    (server, client, peer)
}

#[test]
fn a_flow_ten_times_over_its_limit_is_cut_to_it() {
    let (server, mut client, peer) = limited_client();
    // 25 messages every 10 ms: 2.5 MB/s, ten times the 250 kB/s limit.
    let seconds = 5;
    let (sent, received) = offer(&mut client, &peer, 25, seconds);
    let expected = LIMIT_BITS / 8 * seconds + BURST;
    let rate_bits = received as f64 * 8.0 / seconds as f64;
    eprintln!(
        "bandwidth: offered {:.1} Mbit/s for {seconds} s, {:.3} Mbit/s reached the peer \
         (limit {:.1} Mbit/s, burst {BURST} B)",
        sent as f64 * 8.0 / seconds as f64 / 1e6,
        rate_bits / 1e6,
        LIMIT_BITS as f64 / 1e6
    );
    let error = (received as f64 - expected as f64).abs() / expected as f64;
    assert!(
        error < 0.10,
        "{received} bytes reached the peer, expected {expected} within 10%"
    );
    assert!(
        sent >= 8 * expected,
        "the test offered too little ({sent} bytes) to be over the limit"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    let counted = |c: &serde_json::Value| c["relay"]["bandwidth_dropped"].as_u64() > Some(0);
    while !server.counters().last().is_some_and(counted) {
        assert!(Instant::now() < deadline, "no bandwidth_dropped counted");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_flow_under_its_limit_loses_nothing() {
    let (_server, mut client, peer) = limited_client();
    // 1 message every 10 ms: 100 kB/s, under half the limit.
    let (sent, received) = offer(&mut client, &peer, 1, 3);
    assert_eq!(received, sent, "a flow under the limit lost bytes");
}
