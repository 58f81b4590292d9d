//! The reuseport program keeps every client on the loop the agent computes for it: a group of
//! sockets on one loopback address with `rampart-steer` attached receives datagrams from many
//! source addresses and ports, and each lands on socket `owner_of(source)`, IPv4 and IPv6.
//!
//! Needs root (CAP_BPF). Without root it is skipped with a message, except under CI
//! (`CI=true`), where it fails. Only loopback is used.

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use nix::unistd::Uid;
use rampart_xdp::steering::{Steering, owner_of};
use socket2::{Domain, Protocol, Socket, Type};

const LOOPS: usize = 3;
const CLIENTS: usize = 30;
const DATAGRAMS: usize = 3;

fn reuseport_socket(address: SocketAddr) -> UdpSocket {
    let socket = Socket::new(
        Domain::for_address(address),
        Type::DGRAM,
        Some(Protocol::UDP),
    )
    .expect("socket");
    socket.set_reuse_port(true).expect("SO_REUSEPORT");
    if address.is_ipv6() {
        socket.set_only_v6(true).expect("IPV6_V6ONLY");
    }
    socket.bind(&address.into()).expect("bind");
    socket.set_nonblocking(true).expect("non-blocking");
    socket.into()
}

/// Every client's datagrams, received on which socket of the group.
fn steer(server_ip: &str, client_ips: &[&str]) -> Vec<(SocketAddr, Vec<usize>)> {
    let first = reuseport_socket(SocketAddr::new(server_ip.parse().unwrap(), 0));
    let server = first.local_addr().unwrap();
    let mut group = vec![first];
    group.extend((1..LOOPS).map(|_| reuseport_socket(server)));
    let steering = Steering::attach(&group).expect("the steering program attaches");
    assert_eq!(steering.loops().unwrap(), LOOPS as u32);

    let mut landed = Vec::new();
    for (_, client_ip) in (0..CLIENTS).zip(client_ips.iter().cycle()) {
        let client = UdpSocket::bind(SocketAddr::new(client_ip.parse().unwrap(), 0)).unwrap();
        let source = client.local_addr().unwrap();
        for n in 0..DATAGRAMS {
            client.send_to(&[n as u8; 64], server).unwrap();
        }
        let mut sockets = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(2);
        while sockets.len() < DATAGRAMS && Instant::now() < deadline {
            for (index, socket) in group.iter().enumerate() {
                let mut buf = [0u8; 128];
                while let Ok((_, from)) = socket.recv_from(&mut buf) {
                    assert_eq!(from, source);
                    sockets.push(index);
                }
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        landed.push((source, sockets));
    }
    landed
}

#[test]
fn every_client_lands_on_the_loop_that_owns_it() {
    if !Uid::effective().is_root() {
        let why = "steering needs root (CAP_BPF)";
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("{why}, and CI=true: CI must run it as root");
        }
        eprintln!("\n*** SKIPPED every_client_lands_on_the_loop_that_owns_it: {why} ***\n");
        return;
    }
    for (server, clients) in [
        ("127.0.0.1", &["127.0.0.1", "127.0.0.2", "127.0.0.3"][..]),
        ("::1", &["::1"][..]),
    ] {
        let landed = steer(server, clients);
        let mut per_loop = [0usize; LOOPS];
        for (source, sockets) in &landed {
            let owner = owner_of(*source, LOOPS as u32) as usize;
            assert_eq!(
                sockets,
                &vec![owner; DATAGRAMS],
                "{source}'s datagrams should all reach loop {owner}"
            );
            per_loop[owner] += 1;
        }
        assert!(
            per_loop.iter().all(|n| *n > 0),
            "{CLIENTS} clients on {server} all on some loops only: {per_loop:?}"
        );
    }
}
