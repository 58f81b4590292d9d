//! The next-hop cache, end to end: a real `rampart` with native XDP on the two-armed edge of
//! `rampart_tests::topology`, one client allocation with a channel to a peer, and the kernel's
//! neighbour, route and link tables changed under it. Each step checks what the peer
//! receives and what the agent's counters say the kernel forwarded.
//!
//! How a wrong MAC shows: the peer's interface drops frames addressed to another MAC (the
//! stack takes them for another host's), so after the peer's MAC changes, a message arrives
//! only if the edge put the new MAC on it.
//!
//! 1. Cached: the channel's media is forwarded in the kernel and the counters show both
//!    directions' next hops cached.
//! 2. The peer's MAC changes and the edge's neighbour entry is replaced (`ip neigh replace`):
//!    within one second media reaches the peer again, in the kernel.
//! 3. The neighbour entry is deleted while the peer takes yet another MAC: within one second
//!    media reaches the peer again (userspace relays the first datagrams, whose sending makes
//!    the kernel resolve the neighbour, which brings the cached next hop back); after that
//!    every message arrives, so none left with the old MAC.
//! 4. The same with the entry set FAILED.
//! 5. The egress MTU drops below a datagram: that datagram goes to userspace
//!    (`pass_frag_needed`), a smaller one is still forwarded in the kernel.
//! 6. A route moves a peer address from behind the internal interface to behind the external
//!    one: within one second its datagrams arrive at the host now behind the external one.
//!
//! Needs root (namespaces, XDP); skipped with a message without it, except under CI.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use rampart_tests::media::{
    Channel, client_to_peer, kernel_flow, messages, next_counters, number, slot, userspace_delta,
    xdp_delta,
};
use rampart_tests::netns::{Netns, run_in};
use rampart_tests::topology::{
    CLIENT_IF, CLIENT4, EDGE_EXT_IF, EDGE_INT_IF, EdgeTopology, PEER_IF, PEER4, SenderChecksums,
};
use rampart_tests::{PASSWORD, Proto, Rampart, TurnClient, USER};
use rampart_turn::stun::AddressFamily;
use serde_json::Value;

/// A peer address that no link holds, reached through a route the test moves.
const MOVED4: Ipv4Addr = Ipv4Addr::new(10, 201, 9, 9);
const FOLLOW_LIMIT: Duration = Duration::from_secs(1);
const MESSAGES: usize = 50;

#[test]
fn next_hop_cache_follows_the_kernel() {
    let test = "next_hop_cache_follows_the_kernel";
    let Some(topology) =
        EdgeTopology::create(test, SenderChecksums::Complete).expect("build the topology")
    else {
        return;
    };
    // MOVED4 starts behind the peer host, which holds it.
    let edge = &topology.edge;
    let moved = format!("{MOVED4}/32");
    topology
        .peer
        .ip(&["addr", "add", &moved, "dev", PEER_IF])
        .expect("MOVED4 on the peer");
    topology
        .client
        .ip(&["addr", "add", &moved, "dev", CLIENT_IF])
        .expect("MOVED4 on the client host");
    edge.ip(&[
        "route",
        "add",
        &moved,
        "via",
        &PEER4.to_string(),
        "dev",
        EDGE_INT_IF,
    ])
    .expect("route to MOVED4");

    let mut config = topology.agent_config("native");
    config.allowed_peer_networks.push(moved.clone());
    let server = Rampart::start(&config).expect("start rampart in the edge namespace");
    let result = run(&topology, &server);
    if let Err(problem) = result {
        panic!(
            "{test}: {problem}\n{}\nagent log:\n{}",
            topology.diagnostics(),
            server.log()
        );
    }
}

fn run(topology: &EdgeTopology, server: &Rampart) -> Result<(), String> {
    let listener = server.addr(Proto::Udp, topology.edge_external_ip(false));
    let client_ip = topology.client_ip(false);
    let mut client = run_in(topology.client.name(), || {
        TurnClient::connect_udp(client_ip, listener)
    })
    .map_err(|e| format!("client socket: {e:#}"))?;
    let allocated = client
        .allocate(USER, PASSWORD, AddressFamily::V4)
        .map_err(|e| format!("Allocate: {e:#}"))?;
    let relayed = allocated.relayed[0];
    let peer = run_in(topology.peer.name(), || UdpSocket::bind((PEER4, 0)))
        .map_err(|e| format!("peer socket: {e}"))?;
    let channel = Channel {
        number: 0x4000,
        peer,
        relayed,
    };
    let peer_addr = channel.peer.local_addr().expect("bound");
    client
        .create_permission(&[peer_addr])
        .map_err(|e| format!("CreatePermission: {e:#}"))?;
    client
        .channel_bind(channel.number, peer_addr)
        .map_err(|e| format!("ChannelBind: {e:#}"))?;

    // 1. Cached, and forwarded in the kernel.
    let counters = next_counters(server)?;
    let cached = number(&counters, &["fast_path", "next_hops", "cached"]);
    if cached < 2 {
        return Err(format!(
            "expected both directions' next hops cached: {}",
            counters["fast_path"]
        ));
    }
    in_the_kernel(server, &mut client, &channel, 1)?;

    // 2. The peer's MAC changes; the edge's neighbour entry follows.
    let edge = &topology.edge;
    set_mac(&topology.peer, PEER_IF, "02:00:00:c9:02:a2")?;
    neighbour(
        edge,
        &["replace", "lladdr", "02:00:00:c9:02:a2", "nud", "permanent"],
    )?;
    let took = delivered_within(&mut client, &channel, FOLLOW_LIMIT)?;
    eprintln!("MAC replaced: delivered again after {took:?}");
    in_the_kernel(server, &mut client, &channel, 2)?;

    // 3. The entry is deleted while the peer moves to another MAC: frames still carrying the
    //    old one would be lost at the peer.
    set_mac(&topology.peer, PEER_IF, "02:00:00:c9:02:b3")?;
    neighbour(edge, &["del"])?;
    let took = delivered_within(&mut client, &channel, FOLLOW_LIMIT)?;
    eprintln!("neighbour deleted: delivered again after {took:?}");
    every_message_arrives(&mut client, &channel, 3)?;
    in_the_kernel(server, &mut client, &channel, 4)?;

    // 4. FAILED, likewise.
    set_mac(&topology.peer, PEER_IF, "02:00:00:c9:02:c4")?;
    neighbour(edge, &["replace", "nud", "failed"])?;
    let took = delivered_within(&mut client, &channel, FOLLOW_LIMIT)?;
    eprintln!("neighbour FAILED: delivered again after {took:?}");
    every_message_arrives(&mut client, &channel, 5)?;
    in_the_kernel(server, &mut client, &channel, 6)?;

    // 5. The egress MTU drops: a datagram over it goes to userspace, one under it stays in
    //    the kernel. (20 + 8 + 1300 > 1280 >= 20 + 8 + 1200.)
    edge.ip(&["link", "set", EDGE_INT_IF, "mtu", "1280"])
        .map_err(|e| format!("{e:#}"))?;
    std::thread::sleep(Duration::from_millis(200));
    let before = next_counters(server)?;
    client
        .send_channel_data(channel.number, &vec![0x5a; 1300])
        .map_err(|e| format!("{e:#}"))?;
    client
        .send_channel_data(channel.number, &vec![0x5b; 1200])
        .map_err(|e| format!("{e:#}"))?;
    std::thread::sleep(Duration::from_millis(200));
    let after = next_counters(server)?;
    let delta = xdp_delta(&before, &after);
    let (too_big, forwarded) = (
        slot(&delta, "pass_frag_needed").packets,
        slot(&delta, "forwarded_to_peer").packets,
    );
    if (too_big, forwarded) != (1, 1) {
        return Err(format!(
            "after the MTU drop: pass_frag_needed moved {too_big}, forwarded_to_peer {forwarded}; \
             expected 1 and 1: {delta:?}"
        ));
    }
    edge.ip(&["link", "set", EDGE_INT_IF, "mtu", "1500"])
        .map_err(|e| format!("{e:#}"))?;
    drain(&channel.peer);

    // 6. A route moves: MOVED4 goes from behind i0 (the peer host) to behind e0 (the client
    //    host).
    let behind_peer = run_in(topology.peer.name(), || UdpSocket::bind((MOVED4, 0)))
        .map_err(|e| format!("socket on MOVED4 at the peer: {e}"))?;
    let port = behind_peer.local_addr().expect("bound").port();
    let behind_client = run_in(topology.client.name(), || UdpSocket::bind((MOVED4, port)))
        .map_err(|e| format!("socket on MOVED4 at the client host: {e}"))?;
    let moved_addr = SocketAddr::new(IpAddr::V4(MOVED4), port);
    client
        .create_permission(&[moved_addr])
        .map_err(|e| format!("CreatePermission MOVED4: {e:#}"))?;
    client
        .channel_bind(0x4001, moved_addr)
        .map_err(|e| format!("ChannelBind MOVED4: {e:#}"))?;
    let moved_channel = Channel {
        number: 0x4001,
        peer: behind_peer,
        relayed,
    };
    delivered_within(&mut client, &moved_channel, FOLLOW_LIMIT)
        .map_err(|e| format!("before the route moved: {e}"))?;
    let moved = format!("{MOVED4}/32");
    topology
        .edge
        .ip(&[
            "route",
            "replace",
            &moved,
            "via",
            &CLIENT4.to_string(),
            "dev",
            EDGE_EXT_IF,
        ])
        .map_err(|e| format!("{e:#}"))?;
    let moved_channel = Channel {
        peer: behind_client,
        ..moved_channel
    };
    let took = delivered_within(&mut client, &moved_channel, FOLLOW_LIMIT)
        .map_err(|e| format!("after the route moved behind {EDGE_EXT_IF}: {e}"))?;
    eprintln!("route moved: delivered behind {EDGE_EXT_IF} after {took:?}");
    in_the_kernel(server, &mut client, &moved_channel, 7)?;
    Ok(())
}

/// Sends a message every 10 ms until the peer receives one; how long that took, or an error
/// after `limit`.
fn delivered_within(
    client: &mut TurnClient,
    channel: &Channel,
    limit: Duration,
) -> Result<Duration, String> {
    let started = Instant::now();
    let _ = channel
        .peer
        .set_read_timeout(Some(Duration::from_millis(10)));
    let mut buf = [0u8; 2048];
    while started.elapsed() < limit {
        client
            .send_channel_data(channel.number, b"probe")
            .map_err(|e| format!("{e:#}"))?;
        if channel.peer.recv_from(&mut buf).is_ok() {
            let took = started.elapsed();
            drain(&channel.peer);
            return Ok(took);
        }
    }
    Err(format!(
        "nothing reached {} on channel {:#06x} within {limit:?}",
        channel
            .peer
            .local_addr()
            .map_or("the peer".into(), |a| a.to_string()),
        channel.number
    ))
}

/// Reads whatever the peer has pending (late probes), so that the next check starts clean.
fn drain(peer: &UdpSocket) {
    let _ = peer.set_read_timeout(Some(Duration::from_millis(100)));
    let mut buf = [0u8; 2048];
    for _ in 0..1000 {
        if peer.recv_from(&mut buf).is_err() {
            break;
        }
    }
}

fn every_message_arrives(
    client: &mut TurnClient,
    channel: &Channel,
    tag: u8,
) -> Result<(), String> {
    client_to_peer(client, channel, &messages(tag, MESSAGES))
}

/// Every message arrives, and the kernel forwarded them all (userspace relayed none).
fn in_the_kernel(
    server: &Rampart,
    client: &mut TurnClient,
    channel: &Channel,
    tag: u8,
) -> Result<(), String> {
    let before = next_counters(server)?;
    every_message_arrives(client, channel, tag)?;
    let after = next_counters(server)?;
    let kernel = kernel_flow(&xdp_delta(&before, &after)).to_peer.packets;
    let userspace = userspace_delta(&before, &after).to_peer.packets;
    if kernel != MESSAGES as u64 || userspace != 0 {
        return Err(format!(
            "expected the kernel to forward all {MESSAGES} messages: kernel {kernel}, userspace \
             {userspace}; fast path {}",
            fast_path(&after)
        ));
    }
    Ok(())
}

fn fast_path(counters: &Value) -> String {
    counters["fast_path"].to_string()
}

fn set_mac(ns: &Netns, dev: &str, mac: &str) -> Result<(), String> {
    ns.ip(&["link", "set", dev, "address", mac])
        .map_err(|e| format!("{e:#}"))
}

/// `ip neigh <verb> PEER4 [args] dev i0` in the edge's namespace.
fn neighbour(edge: &Netns, args: &[&str]) -> Result<(), String> {
    let peer = PEER4.to_string();
    let mut all = vec!["neigh", args[0], &peer];
    all.extend_from_slice(&args[1..]);
    all.extend_from_slice(&["dev", EDGE_INT_IF]);
    edge.ip(&all)
        .map_err(|e| format!("ip {}: {e:#}", all.join(" ")))
}
