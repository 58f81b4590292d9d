//! The relay loops (`[relay] loops`): many clients, spread over several loops, each relayed
//! both ways through the real binary; with the reuseport steering program every client
//! datagram reaches its owner loop in the kernel (none is handed over), without it the loops
//! hand over what they do not own and relaying is just as complete. With the gathering
//! program, peer datagrams reach each loop on its one receive socket; without it, on the
//! relay sockets. A reservation made on one loop is redeemed by a client another loop owns.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::time::Duration;

use rampart_tests::{PASSWORD, PEER_V4, Proto, Rampart, RampartConfig, Received, TurnClient, USER};
use rampart_turn::stun::{AddressFamily, Attribute};
use relay_common::steering::owner_of;

const LOOPS: usize = 4;
const CLIENTS: usize = 16;
const CHANNEL: u16 = 0x4001;

#[test]
fn steered_clients_are_never_handed_over_and_peers_are_gathered() {
    let shell = relay_through_loops(true);
    assert_eq!(
        shell["datagrams_handed_off"], 0,
        "the steering program put every datagram on its owner loop"
    );
    assert!(
        shell["peer_datagrams_gathered"].as_u64() >= Some(CLIENTS as u64 + 1),
        "every peer datagram reached its loop's receive socket: {shell}"
    );
}

#[test]
fn without_the_programs_loops_hand_datagrams_over_and_read_each_relay_socket() {
    let shell = relay_through_loops(false);
    assert!(
        shell["datagrams_handed_off"].as_u64() > Some(0),
        "{CLIENTS} clients over {LOOPS} loops by the kernel's own hash: some land elsewhere"
    );
    assert_eq!(shell["peer_datagrams_gathered"], 0, "{shell}");
}

/// Relay with every client over UDP and one over TCP, with both BPF programs or neither;
/// returns the shell's counters (`datagrams_handed_off` counted since the first line).
fn relay_through_loops(programs: bool) -> serde_json::Value {
    let mut config = RampartConfig::loopback(&[
        (Proto::Udp, IpAddr::V4(Ipv4Addr::LOCALHOST)),
        (Proto::Tcp, IpAddr::V4(Ipv4Addr::LOCALHOST)),
    ]);
    config.relay.push(("loops".into(), LOOPS.to_string()));
    config.relay.push(("steering".into(), programs.to_string()));
    config
        .relay
        .push(("gather_peers".into(), programs.to_string()));
    config
        .limits
        .push(("allocations_per_user".into(), "100".into()));
    config.stats_interval = Some(1);
    let server = Rampart::start(&config).expect("start rampart");
    // Readiness probes that arrived before the steering program was attached may have been
    // handed over: count from the first counters line, logged after them.
    let before = shell(&server, |_| true)["datagrams_handed_off"]
        .as_u64()
        .unwrap();
    let peer = UdpSocket::bind((PEER_V4, 0)).unwrap();
    peer.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let peer_addr = peer.local_addr().unwrap();
    let mut clients: Vec<(TurnClient, SocketAddr)> = Vec::new();
    for i in 0..=CLIENTS {
        let proto = if i == CLIENTS { Proto::Tcp } else { Proto::Udp };
        let mut client = server.client(proto, false).expect("connect");
        let relayed = client
            .allocate(USER, PASSWORD, AddressFamily::V4)
            .expect("Allocate")
            .relayed();
        client
            .channel_bind(CHANNEL, peer_addr)
            .expect("ChannelBind");
        clients.push((client, relayed));
    }
    for (i, (client, relayed)) in clients.iter_mut().enumerate() {
        let data = format!("client {i} to the peer").into_bytes();
        client.send_channel_data(CHANNEL, &data).unwrap();
        let mut buf = [0u8; 1500];
        let (len, from) = peer
            .recv_from(&mut buf)
            .expect("the peer hears every client");
        assert_eq!((&buf[..len], from), (data.as_slice(), *relayed));
        let back = format!("peer to client {i}").into_bytes();
        peer.send_to(&back, *relayed).unwrap();
        assert_eq!(
            client.expect_recv().unwrap(),
            Received::Channel {
                channel: CHANNEL,
                data: back
            }
        );
    }
    redeem_a_reservation_elsewhere(&server);
    // Counters are logged each second when they changed: the last line, once it shows
    // every allocation and every relayed packet, covers everything above.
    let mut after = shell(&server, |last| {
        last["allocations"] == (CLIENTS + 3) as u64
            && last["relay"]["to_client_packets"].as_u64() >= Some(CLIENTS as u64 + 1)
    });
    after["datagrams_handed_off"] =
        (after["datagrams_handed_off"].as_u64().unwrap() - before).into();
    after
}

/// The shell's counters in the last counters line, once that line satisfies `ready`.
fn shell(server: &Rampart, ready: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(last) = server.counters().pop()
            && ready(&last)
        {
            return last["shell"].clone();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no counters line as expected: {:?}",
            server.counters().pop()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// RFC 8656 §7.2: EVEN-PORT with R reserves the next port; a client that another loop owns
/// gets it with the token.
fn redeem_a_reservation_elsewhere(server: &Rampart) {
    let mut first = server.client(Proto::Udp, false).expect("connect");
    let response = first
        .try_allocate(USER, PASSWORD, &[Attribute::EvenPort { reserve: true }])
        .expect("Allocate with EVEN-PORT");
    let message = response.message();
    let token = message.reservation_token().expect("a RESERVATION-TOKEN");
    let even = message.xor_relayed_addresses().next().expect("a relay");
    let first_loop = owner_of(first.local_addr(), LOOPS as u32);
    let mut second = (0..64)
        .map(|_| server.client(Proto::Udp, false).expect("connect"))
        .find(|c| owner_of(c.local_addr(), LOOPS as u32) != first_loop)
        .expect("a client on another loop");
    let response = second
        .try_allocate(USER, PASSWORD, &[Attribute::ReservationToken(token)])
        .expect("Allocate with the token");
    let relayed = response.message().xor_relayed_addresses().next();
    assert_eq!(
        relayed.map(|r| r.port()),
        Some(even.port() + 1),
        "{}",
        response.describe()
    );
}
