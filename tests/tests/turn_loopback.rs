//! TURN through the real `rampart` binary, for each client transport (UDP, TCP, TLS) and
//! family (IPv4, IPv6): Allocate -> CreatePermission -> ChannelBind, with data both ways.
//! Client to peer as a Send indication and as ChannelData; peer to client as a Data
//! indication before the channel exists and as ChannelData after (RFC 8656 §11, §12).
//! The peer is a plain UDP socket on loopback, which the configuration allows.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rampart_tests::client::loopback;
use rampart_tests::{
    PASSWORD, PEER_V4, Proto, RECV_TIMEOUT, REST_SECRET, Rampart, RampartConfig, Received,
    TurnClient, USER, with_peer_address,
};
use rampart_turn::auth::credentials::rest_password;
use rampart_turn::stun::AddressFamily;

const CHANNEL: u16 = 0x4001;
/// Lengths around the 4-byte padding boundary of stream framing (RFC 8656 §12.5), and one
/// well past a typical media packet.
const LENGTHS: [usize; 7] = [1, 2, 3, 4, 5, 8, 1200];

#[test]
fn udp_ipv4() {
    relay_both_ways(Proto::Udp, false);
}

#[test]
fn udp_ipv6() {
    relay_both_ways(Proto::Udp, true);
}

#[test]
fn tcp_ipv4() {
    relay_both_ways(Proto::Tcp, false);
}

#[test]
fn tcp_ipv6() {
    relay_both_ways(Proto::Tcp, true);
}

#[test]
fn tls_ipv4() {
    relay_both_ways(Proto::Tls, false);
}

#[test]
fn tls_ipv6() {
    relay_both_ways(Proto::Tls, true);
}

fn relay_both_ways(proto: Proto, v6: bool) {
    let test = format!("turn_loopback {proto:?} IPv{}", if v6 { 6 } else { 4 });
    with_peer_address(v6, &test, move |peer_ip| scenario(proto, v6, peer_ip));
}

fn scenario(proto: Proto, v6: bool, peer_ip: IpAddr) {
    let server = Rampart::start(&RampartConfig::single(proto, v6)).expect("start rampart");
    let mut client = server.client(proto, v6).expect("connect");
    let family = if v6 {
        AddressFamily::V6
    } else {
        AddressFamily::V4
    };

    let allocated = client.allocate(USER, PASSWORD, family).expect("Allocate");
    let relayed = allocated.relayed();
    assert_eq!(allocated.relayed.len(), 1, "one family asked, one relay");
    assert_eq!(relayed.ip(), loopback(v6), "relay address family/IP");
    let (first, last) = server.relay_range();
    assert!(
        (first..=last).contains(&relayed.port()),
        "relayed port {} outside the configured {first}-{last}",
        relayed.port()
    );
    assert_eq!(
        allocated.mapped,
        Some(client.local_addr()),
        "XOR-MAPPED-ADDRESS must be the client's own address on loopback"
    );
    assert!(allocated.lifetime.is_some_and(|l| l > 0), "LIFETIME");

    let peer = Peer::bind(peer_ip);
    client
        .create_permission(&[peer.addr])
        .expect("CreatePermission");

    // Client -> peer without a channel.
    client
        .send_indication(peer.addr, b"send indication to the peer")
        .unwrap();
    assert_eq!(
        peer.recv(),
        (b"send indication to the peer".to_vec(), relayed),
        "the peer sees the payload, from the relayed address"
    );

    // Peer -> client without a channel: a Data indication naming the peer.
    peer.send(b"data indication to the client", relayed);
    assert_eq!(
        client.expect_recv().unwrap(),
        Received::Data {
            peer: peer.addr,
            data: b"data indication to the client".to_vec()
        }
    );

    client
        .channel_bind(CHANNEL, peer.addr)
        .expect("ChannelBind");

    for len in LENGTHS {
        let data = payload(len, 0x10);
        client.send_channel_data(CHANNEL, &data).unwrap();
        assert_eq!(
            peer.recv(),
            (data, relayed),
            "ChannelData of {len} bytes reaches the peer exactly, padding stripped"
        );
    }
    for len in LENGTHS {
        let data = payload(len, 0x80);
        peer.send(&data, relayed);
        assert_eq!(
            client.expect_recv().unwrap(),
            Received::Channel {
                channel: CHANNEL,
                data
            },
            "peer datagram of {len} bytes comes back on the channel"
        );
    }

    // RFC 8656 §12: with a channel bound, Send indications to the same peer still work.
    client.send_indication(peer.addr, b"still fine").unwrap();
    assert_eq!(peer.recv(), (b"still fine".to_vec(), relayed));

    assert_eq!(client.refresh(600).expect("Refresh"), 600);

    // Refresh with LIFETIME 0 deletes the allocation (RFC 8656 §8): nothing from the peer
    // reaches the client any more, and the allocation is gone for later requests.
    assert_eq!(client.refresh(0).expect("Refresh(0)"), 0);
    peer.send(b"after the allocation is gone", relayed);
    let late = client.recv(Duration::from_millis(300)).unwrap();
    assert_eq!(late, None, "data after deletion must not be relayed");
    let response = client.try_create_permission(&[peer.addr]).unwrap();
    assert_eq!(
        response.error_code(),
        Some(437),
        "CreatePermission without an allocation: {}",
        response.describe()
    );
}

/// Static users are for development; front-ends mint TURN REST API credentials
/// (`expiry:user`, base64(HMAC-SHA1(secret, username))). One round trip proves they work
/// end to end, with the relay reached on a channel.
#[test]
fn rest_api_credentials() {
    let server = Rampart::start(&RampartConfig::single(Proto::Udp, false)).expect("start");
    let mut client = server.client(Proto::Udp, false).unwrap();
    let (username, password) =
        rampart_tests::rest_credentials(REST_SECRET, "bob", Duration::from_secs(3600));
    let relayed = client
        .allocate(&username, &password, AddressFamily::V4)
        .expect("Allocate with REST credentials")
        .relayed();
    let peer = Peer::bind(IpAddr::V4(PEER_V4));
    client.channel_bind(0x4ABC, peer.addr).expect("ChannelBind");
    peer.send(b"hello bob", relayed);
    assert_eq!(
        client.expect_recv().unwrap(),
        Received::Channel {
            channel: 0x4ABC,
            data: b"hello bob".to_vec()
        }
    );
}

/// Front-ends mint REST credentials for the longest lifetime the relay accepts: coturn's
/// `turnutils_uclient -W` uses `now + 86400`, which is exactly the default
/// `rest_max_lifetime`. Minted on this host's clock, such a credential must be accepted at
/// any moment. The attempts sweep more than a second, so any sub-second phase at which the
/// server's idea of "now" lags the wall clock is hit.
#[test]
fn rest_credentials_for_the_full_max_lifetime() {
    const DEFAULT_REST_MAX_LIFETIME: u64 = 86_400;
    let server = Rampart::start(&RampartConfig::single(Proto::Udp, false)).expect("start");
    let mut refused = Vec::new();
    for attempt in 0..22 {
        std::thread::sleep(Duration::from_millis(50));
        let mut client = server.client(Proto::Udp, false).unwrap();
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
        let username = format!(
            "{}:full-lifetime-{attempt}",
            now.as_secs() + DEFAULT_REST_MAX_LIFETIME
        );
        let password = rest_password(REST_SECRET.as_bytes(), &username);
        let response = client.try_allocate(&username, &password, &[]).unwrap();
        if !response.is_success() {
            refused.push(format!(
                "{} at wall clock {}.{:03}",
                response.describe(),
                now.as_secs(),
                now.subsec_millis()
            ));
        }
    }
    assert!(
        refused.is_empty(),
        "credentials expiring now + {DEFAULT_REST_MAX_LIFETIME} s were refused:\n{}",
        refused.join("\n")
    );
}

/// One client allocation per transport at once on one server, each relaying to its own
/// peer: allocations are keyed by 5-tuple and must not see each other's data.
#[test]
fn concurrent_allocations_stay_apart() {
    let config = RampartConfig::loopback(&[
        (Proto::Udp, loopback(false)),
        (Proto::Tcp, loopback(false)),
        (Proto::Tls, loopback(false)),
    ]);
    let server = Rampart::start(&config).expect("start");
    let mut sessions: Vec<(TurnClient, SocketAddr, Peer)> = Proto::ALL
        .iter()
        .map(|proto| {
            let mut client = server.client(*proto, false).unwrap();
            let relayed = client
                .allocate(USER, PASSWORD, AddressFamily::V4)
                .unwrap()
                .relayed();
            let peer = Peer::bind(IpAddr::V4(PEER_V4));
            client.channel_bind(CHANNEL, peer.addr).unwrap();
            (client, relayed, peer)
        })
        .collect();
    let relays: Vec<SocketAddr> = sessions.iter().map(|(_, r, _)| *r).collect();
    assert!(
        relays
            .iter()
            .enumerate()
            .all(|(i, r)| !relays[..i].contains(r)),
        "relayed addresses must differ: {relays:?}"
    );
    for (i, (_, relayed, peer)) in sessions.iter().enumerate() {
        peer.send(format!("for session {i}").as_bytes(), *relayed);
    }
    for (i, (client, _, _)) in sessions.iter_mut().enumerate() {
        assert_eq!(
            client.expect_recv().unwrap(),
            Received::Channel {
                channel: CHANNEL,
                data: format!("for session {i}").into_bytes()
            }
        );
    }
}

/// A client that sends the moment its allocation and permission exist (as ICE agents do)
/// must not lose that first datagram: the relay socket is brand new when it is used.
#[test]
fn first_datagram_on_a_fresh_allocation_is_relayed() {
    let server = Rampart::start(&RampartConfig::single(Proto::Udp, false)).expect("start");
    let peer = Peer::bind(IpAddr::V4(PEER_V4));
    for attempt in 0..5 {
        let mut client = server.client(Proto::Udp, false).unwrap();
        let relayed = client
            .allocate(USER, PASSWORD, AddressFamily::V4)
            .unwrap()
            .relayed();
        client.create_permission(&[peer.addr]).unwrap();
        let data = format!("first datagram, allocation {attempt}").into_bytes();
        client.send_indication(peer.addr, &data).unwrap();
        assert_eq!(peer.recv(), (data, relayed), "allocation {attempt}");
    }
}

/// A plain UDP socket on loopback: the far end of the relay.
struct Peer {
    socket: UdpSocket,
    addr: SocketAddr,
}

impl Peer {
    fn bind(ip: IpAddr) -> Peer {
        let socket = UdpSocket::bind(SocketAddr::new(ip, 0)).expect("bind peer");
        socket.set_read_timeout(Some(RECV_TIMEOUT)).unwrap();
        let addr = socket.local_addr().unwrap();
        Peer { socket, addr }
    }

    fn send(&self, data: &[u8], to: SocketAddr) {
        self.socket.send_to(data, to).expect("peer send");
    }

    fn recv(&self) -> (Vec<u8>, SocketAddr) {
        let mut buf = vec![0u8; 65_536];
        let (n, from) = self
            .socket
            .recv_from(&mut buf)
            .unwrap_or_else(|e| panic!("peer {} received nothing: {e}", self.addr));
        buf.truncate(n);
        (buf, from)
    }
}

/// `len` bytes counting up from `start`, so a shifted or truncated payload shows.
fn payload(len: usize, start: u8) -> Vec<u8> {
    (0..len).map(|i| start.wrapping_add(i as u8)).collect()
}
