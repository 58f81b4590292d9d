//! When an allocation ends, its relay port is closed: after Refresh with LIFETIME 0
//! (RFC 8656 §8), when its TCP/TLS connection closes (§3.1: the allocation lives and dies
//! with the connection), and when its lifetime runs out without a refresh (§7.2).
//!
//! The observable is the port itself: while the server holds the relay socket, binding the
//! relayed address from the test fails with "address in use"; once it is released, the
//! bind succeeds. Releases are asynchronous to the client, so they are polled (bounded).

use std::io::ErrorKind;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use rampart_tests::{
    PASSWORD, PEER_V4, Proto, RECV_TIMEOUT, Rampart, RampartConfig, Received, USER,
};
use rampart_turn::stun::AddressFamily;

#[test]
fn refresh_zero_releases_the_relay_port() {
    let server = Rampart::start(&RampartConfig::single(Proto::Udp, false)).unwrap();
    let mut client = server.client(Proto::Udp, false).unwrap();
    let relayed = client
        .allocate(USER, PASSWORD, AddressFamily::V4)
        .unwrap()
        .relayed();
    assert_held(relayed);
    assert_eq!(client.refresh(0).unwrap(), 0);
    wait_released(relayed, RECV_TIMEOUT);
}

#[test]
fn closing_the_tcp_connection_releases_the_allocation() {
    let server = Rampart::start(&RampartConfig::single(Proto::Tcp, false)).unwrap();
    let mut client = server.client(Proto::Tcp, false).unwrap();
    let relayed = client
        .allocate(USER, PASSWORD, AddressFamily::V4)
        .unwrap()
        .relayed();
    assert_held(relayed);
    drop(client);
    wait_released(relayed, RECV_TIMEOUT);
}

#[test]
fn an_unrefreshed_allocation_expires() {
    // The shortest lifetimes the configuration accepts; the server sweeps once a second.
    let config = RampartConfig::single(Proto::Udp, false)
        .with_relay_setting("default_lifetime", "2")
        .with_relay_setting("max_lifetime", "2");
    let server = Rampart::start(&config).unwrap();
    let mut client = server.client(Proto::Udp, false).unwrap();
    let allocated = client.allocate(USER, PASSWORD, AddressFamily::V4).unwrap();
    assert_eq!(
        allocated.lifetime,
        Some(2),
        "LIFETIME is capped at max_lifetime"
    );
    let relayed = allocated.relayed();

    let peer = UdpSocket::bind(SocketAddr::new(IpAddr::V4(PEER_V4), 0)).unwrap();
    let peer_addr = peer.local_addr().unwrap();
    client.channel_bind(0x4000, peer_addr).unwrap();
    peer.send_to(b"while alive", relayed).unwrap();
    assert_eq!(
        client.expect_recv().unwrap(),
        Received::Channel {
            channel: 0x4000,
            data: b"while alive".to_vec()
        }
    );

    // Two seconds of lifetime, up to one of sweep delay, and some slack.
    wait_released(relayed, Duration::from_secs(6));
    let response = client.try_create_permission(&[peer_addr]).unwrap();
    assert_eq!(
        response.error_code(),
        Some(437),
        "the expired allocation is gone: {}",
        response.describe()
    );
}

fn assert_held(relayed: SocketAddr) {
    match UdpSocket::bind(relayed) {
        Err(e) if e.kind() == ErrorKind::AddrInUse => {}
        other => panic!("the server should hold {relayed} while allocated; bind gave {other:?}"),
    }
}

fn wait_released(relayed: SocketAddr, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        match UdpSocket::bind(relayed) {
            Ok(_) => return,
            Err(e) if e.kind() == ErrorKind::AddrInUse && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("{relayed} still held {limit:?} after the allocation ended: {e}"),
        }
    }
}
