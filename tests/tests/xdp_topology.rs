//! The XDP fast path's acceptance test: a real `rampart` on a two-armed edge, a TURN client
//! on the outside, a UDP peer on the inside, every host in a network namespace of its own
//! (see `rampart_tests::topology`), media over bound channels in both directions.
//!
//! - `[xdp] mode = "native"` on both edge interfaces: every ChannelData message from the
//!   client and every datagram from the peer arrives, byte for byte, and the XDP program's
//!   `forwarded_to_peer` / `forwarded_to_client` counters account for each of them (packets
//!   and frame bytes), while the agent's userspace relay counters do not move.
//! - `[xdp] mode = "off"`, same topology, same traffic: it all arrives too, and now the
//!   userspace counters account for it. The two paths deliver the same bytes.
//!
//! Each mode runs the same cases: IPv4 client and peer; IPv6 client and peer; an IPv4 client
//! with an IPv6 relay and peer (REQUESTED-ADDRESS-FAMILY); an IPv6 client with an IPv4 relay
//! and peer; and an IPv4 client with a dual-stack allocation (ADDITIONAL-ADDRESS-FAMILY) and a
//! channel to a peer of each family.
//!
//! The client and the peer send datagrams with complete UDP checksums (TX checksum offload off
//! on their veths), as frames from a wire have them. With veth's default, checksums left to
//! offload, the program forwards datagrams the receiver drops as corrupt:
//! `xdp_native_with_checksums_left_to_offload` reproduces that and is ignored until the
//! program deals with such datagrams.
//!
//! The counters come from the agent's `counters` log line (`--stats-interval 1`): one is
//! awaited after a case's allocation and channels are set up and one after its media, and
//! their difference is what the media did.
//!
//! Needs root (namespaces, XDP); skipped with a message without it, except under CI
//! (`CI=true`), where it fails. Run: `cargo build -p relay-user && cargo test -p
//! rampart-tests --test xdp_topology`.

use std::fmt::Write as _;
use std::net::{SocketAddr, UdpSocket};
use std::time::Instant;

use rampart_tests::media::{
    Channel, Expect, Flow, client_to_peer, kernel_flow, messages, next_counters, number,
    peer_to_client, slot, userspace_delta, xdp_delta,
};
use rampart_tests::netns::run_in;
use rampart_tests::topology::{EDGE_EXT_IF, EDGE_INT_IF, EdgeTopology, SenderChecksums};
use rampart_tests::{PASSWORD, Proto, Rampart, TurnClient, USER};
use rampart_turn::stun::{AddressFamily, Attribute};

/// Messages each way on each channel.
const MESSAGES: usize = 200;
const FIRST_CHANNEL: u16 = 0x4000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// `[xdp] mode = "native"` on e0 and i0 (next hops cached in the bindings).
    Xdp,
    /// Native, with `cache_next_hops = false`: every frame takes the program's FIB lookup.
    XdpFibLookup,
    /// Native XDP, with senders that leave their UDP checksums to offload: the program must
    /// hand every such datagram to userspace (it cannot complete the checksum), which relays
    /// it.
    XdpPartialChecksums,
    /// `[xdp] mode = "off"`.
    Userspace,
}

/// How the client asks for its relay addresses.
#[derive(Clone, Copy, Debug)]
enum Allocate {
    /// No address-family attribute: the server's default, IPv4.
    Default,
    /// REQUESTED-ADDRESS-FAMILY IPv6.
    RequestedV6,
    /// ADDITIONAL-ADDRESS-FAMILY IPv6: an IPv4 and an IPv6 relay address.
    DualStack,
}

struct Case {
    name: &'static str,
    client_v6: bool,
    allocate: Allocate,
    /// One channel per peer, of these families.
    peers_v6: &'static [bool],
}

const CASES: [Case; 5] = [
    Case {
        name: "IPv4 client, IPv4 peer",
        client_v6: false,
        allocate: Allocate::Default,
        peers_v6: &[false],
    },
    Case {
        name: "IPv6 client, IPv6 peer",
        client_v6: true,
        allocate: Allocate::RequestedV6,
        peers_v6: &[true],
    },
    Case {
        name: "IPv4 client, IPv6 peer",
        client_v6: false,
        allocate: Allocate::RequestedV6,
        peers_v6: &[true],
    },
    Case {
        name: "IPv6 client, IPv4 peer",
        client_v6: true,
        allocate: Allocate::Default,
        peers_v6: &[false],
    },
    Case {
        name: "IPv4 client, dual-stack allocation, IPv4 and IPv6 peers",
        client_v6: false,
        allocate: Allocate::DualStack,
        peers_v6: &[false, true],
    },
];

#[test]
fn xdp_native_forwards_all_channel_media_in_the_kernel() {
    run(
        "xdp_topology (xdp native)",
        Mode::Xdp,
        SenderChecksums::Complete,
    );
}

#[test]
fn xdp_native_without_cached_next_hops_forwards_all_channel_media_in_the_kernel() {
    run(
        "xdp_topology (xdp native, FIB lookup per packet)",
        Mode::XdpFibLookup,
        SenderChecksums::Complete,
    );
}

#[test]
fn userspace_relays_the_same_media_with_xdp_off() {
    run(
        "xdp_topology (xdp off)",
        Mode::Userspace,
        SenderChecksums::Complete,
    );
}

/// The same as the native test, but the client's and the peer's datagrams reach the edge
/// with the checksums their stacks left for offload (veth's default, and what a process on
/// the same host sends): the field holds only the pseudo-header sum, so a rewrite could not
/// keep it right. The program leaves each to userspace (counted in `pass_checksum_partial`),
/// and everything still arrives intact.
#[test]
fn xdp_native_with_checksums_left_to_offload() {
    run(
        "xdp_topology (xdp native, deferred checksums)",
        Mode::XdpPartialChecksums,
        SenderChecksums::Deferred,
    );
}

fn run(test: &str, mode: Mode, checksums: SenderChecksums) {
    let Some(topology) = EdgeTopology::create(test, checksums).expect("build the topology") else {
        return;
    };
    let mut config = topology.agent_config(match mode {
        Mode::Xdp | Mode::XdpFibLookup | Mode::XdpPartialChecksums => "native",
        Mode::Userspace => "off",
    });
    if let (Mode::XdpFibLookup, Some(xdp)) = (mode, &mut config.xdp) {
        xdp.cache_next_hops = Some(false);
    }
    let server = Rampart::start(&config).expect("start rampart in the edge namespace");
    if mode != Mode::Userspace {
        let log = server.log();
        for interface in [EDGE_EXT_IF, EDGE_INT_IF] {
            assert!(
                log.lines().any(|l| l.contains("XDP fast path attached")
                    && l.contains(&format!("\"{interface}\""))
                    && l.contains("\"native\"")),
                "no native XDP attachment to {interface} in the log"
            );
        }
    }

    let started = Instant::now();
    let mut summary = String::new();
    let mut failures = Vec::new();
    let mut bound = 0;
    for (index, case) in CASES.iter().enumerate() {
        match run_case(&topology, &server, mode, case, index, &mut bound) {
            Ok(line) => {
                let _ = writeln!(summary, "  ok    {}: {line}", case.name);
            }
            Err(problem) => {
                let _ = writeln!(summary, "  FAIL  {}: {problem}", case.name);
                if failures.is_empty() {
                    let _ = writeln!(summary, "{}", topology.diagnostics());
                }
                failures.push(case.name);
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{test}: {} of {} cases failed: {failures:?}\n{summary}",
        failures.len(),
        CASES.len()
    );
    eprintln!(
        "{test}: {} cases passed in {:.1?}\n{summary}",
        CASES.len(),
        started.elapsed()
    );
}

/// Sets up an allocation with a channel per peer, runs the media both ways on each, and checks
/// delivery and the counters. `bound`: channels the server bound so far, over all cases. Ok: a
/// one-line account of the counters.
fn run_case(
    topology: &EdgeTopology,
    server: &Rampart,
    mode: Mode,
    case: &Case,
    index: usize,
    bound: &mut u64,
) -> Result<String, String> {
    let err = |what: &str, e: anyhow::Error| format!("{what}: {e:#}");
    let listener = server.addr(Proto::Udp, topology.edge_external_ip(case.client_v6));
    let client_ip = topology.client_ip(case.client_v6);
    // Sockets keep the namespace they were made in, whichever thread uses them later.
    let mut client = run_in(topology.client.name(), || {
        TurnClient::connect_udp(client_ip, listener)
    })
    .map_err(|e| err("client socket", e))?;
    let allocated = match case.allocate {
        Allocate::Default => client.allocate(USER, PASSWORD, AddressFamily::V4),
        Allocate::RequestedV6 => client.allocate(USER, PASSWORD, AddressFamily::V6),
        Allocate::DualStack => client.allocate_with(
            USER,
            PASSWORD,
            &[Attribute::AdditionalAddressFamily(AddressFamily::V6)],
        ),
    }
    .map_err(|e| err("Allocate", e))?;

    let mut channels = Vec::new();
    for (k, &peer_v6) in case.peers_v6.iter().enumerate() {
        let relayed = *allocated
            .relayed
            .iter()
            .find(|a| a.is_ipv6() == peer_v6)
            .ok_or_else(|| format!("no relayed address of the peer's family in {allocated:?}"))?;
        if relayed.ip() != topology.edge_internal_ip(peer_v6) {
            return Err(format!(
                "relayed address {relayed} is not on the edge's internal interface"
            ));
        }
        let peer_ip = topology.peer_ip(peer_v6);
        let peer = run_in(topology.peer.name(), || UdpSocket::bind((peer_ip, 0)))
            .map_err(|e| format!("peer socket on {peer_ip}: {e}"))?;
        channels.push(Channel {
            number: FIRST_CHANNEL + u16::try_from(k).expect("few channels"),
            peer,
            relayed,
        });
    }
    let peer_addrs: Vec<SocketAddr> = channels
        .iter()
        .map(|c| c.peer.local_addr().expect("bound"))
        .collect();
    client
        .create_permission(&peer_addrs)
        .map_err(|e| err("CreatePermission", e))?;
    for (channel, peer) in channels.iter().zip(&peer_addrs) {
        client
            .channel_bind(channel.number, *peer)
            .map_err(|e| err("ChannelBind", e))?;
        *bound += 1;
    }

    // The counters once the allocation and its channels are in place, before any media.
    let before = next_counters(server)?;
    if mode != Mode::Userspace {
        let installed = number(&before, &["fast_path", "channels_installed"]);
        if installed != *bound {
            return Err(format!(
                "fast_path.channels_installed is {installed} after the channels were bound, \
                 expected {bound}"
            ));
        }
    }

    // Expected accounting: data bytes (userspace counts those) and frame bytes as received
    // (the XDP program counts those: Ethernet + IP + UDP [+ ChannelData header] + data).
    let mut expect = Expect::default();
    for channel in &channels {
        let tag = u8::try_from(index * 4 + usize::from(channel.number - FIRST_CHANNEL))
            .expect("small tag");
        let outbound = messages(tag, MESSAGES);
        let inbound = messages(tag ^ 0x80, MESSAGES);
        client_to_peer(&mut client, channel, &outbound)?;
        peer_to_client(&mut client, channel, &inbound)?;
        expect.record(case.client_v6, channel, &outbound, &inbound);
    }

    let after = next_counters(server)?;
    let userspace = userspace_delta(&before, &after);
    let xdp_delta = xdp_delta(&before, &after);
    let kernel = kernel_flow(&xdp_delta);
    let account = format!(
        "{} message(s) each way on {} channel(s); userspace relay {userspace}; XDP {kernel}; \
         all XDP slots that moved: {xdp_delta:?}",
        MESSAGES * channels.len(),
        channels.len()
    );
    match mode {
        Mode::Xdp | Mode::XdpFibLookup => {
            // Next hops cached (the neighbours are known), or none with the cache off.
            let cached = number(&after, &["fast_path", "next_hops", "cached"]);
            if (cached > 0) != (mode == Mode::Xdp) {
                return Err(format!(
                    "fast_path.next_hops.cached is {cached} in mode {mode:?}: {}",
                    after["fast_path"]
                ));
            }
            // A complete checksum equals the pseudo-header sum one time in 65536 (random
            // ports): the program then rightly takes such a datagram for an offload-partial
            // one and leaves it to userspace. Those, and only those, may reach userspace.
            let partial = slot(&xdp_delta, "pass_checksum_partial").packets;
            let frames = expect.frames();
            let exact = userspace == Flow::default() && kernel == frames;
            let explained = partial > 0
                && userspace.to_peer.packets + userspace.to_client.packets == partial
                && kernel.to_peer.packets + userspace.to_peer.packets == frames.to_peer.packets
                && kernel.to_client.packets + userspace.to_client.packets
                    == frames.to_client.packets;
            if !exact && !explained {
                return Err(format!(
                    "the XDP counters do not account for the media (expected {frames} in the \
                     kernel, nothing in userspace): {account}"
                ));
            }
        }
        Mode::XdpPartialChecksums => {
            let data = expect.data();
            let partial = slot(&xdp_delta, "pass_checksum_partial").packets;
            let all = expect.to_peer.packets + expect.to_client.packets;
            if userspace != data || kernel != Flow::default() || partial != all {
                return Err(format!(
                    "expected userspace to relay everything ({data}) after the program passed \
                     all {all} datagrams as pass_checksum_partial: {account}"
                ));
            }
        }
        Mode::Userspace => {
            let data = expect.data();
            if userspace != data {
                return Err(format!(
                    "the userspace counters do not account for the media (expected {data}): \
                     {account}"
                ));
            }
            if !xdp_delta.is_empty() || !after["fast_path"].is_null() {
                return Err(format!("a fast path is active with mode = off: {account}"));
            }
        }
    }
    Ok(account)
}

/// `[xdp] max_channels = 1`: the first channel is forwarded in the kernel, the second finds the
/// maps full and is relayed in userspace, counted and logged; both carry all their media.
#[test]
fn full_channel_maps_leave_further_channels_to_userspace() {
    let Some(topology) =
        EdgeTopology::create("xdp_topology (maps full)", SenderChecksums::Complete)
            .expect("build the topology")
    else {
        return;
    };
    let mut config = topology.agent_config("native");
    config.xdp.as_mut().expect("an [xdp] section").max_channels = Some(1);
    let server = Rampart::start(&config).expect("start rampart in the edge namespace");
    let listener = server.addr(Proto::Udp, topology.edge_external_ip(false));
    let client_ip = topology.client_ip(false);
    let mut client = run_in(topology.client.name(), || {
        TurnClient::connect_udp(client_ip, listener)
    })
    .expect("client socket");
    let allocated = client
        .allocate(USER, PASSWORD, AddressFamily::V4)
        .expect("Allocate");
    let peer_ip = topology.peer_ip(false);
    let channels: Vec<Channel> = (0..2)
        .map(|k| Channel {
            number: FIRST_CHANNEL + k,
            peer: run_in(topology.peer.name(), || UdpSocket::bind((peer_ip, 0)))
                .expect("peer socket"),
            relayed: allocated.relayed[0],
        })
        .collect();
    let peers: Vec<SocketAddr> = channels
        .iter()
        .map(|c| c.peer.local_addr().expect("bound"))
        .collect();
    client.create_permission(&peers).expect("CreatePermission");
    for (channel, peer) in channels.iter().zip(&peers) {
        client
            .channel_bind(channel.number, *peer)
            .expect("ChannelBind");
    }
    let before = next_counters(&server).expect("counters after binding");
    assert_eq!(number(&before, &["fast_path", "channels_installed"]), 1);
    assert_eq!(number(&before, &["fast_path", "map_full"]), 1);
    assert!(
        server.log().contains("XDP channel maps full"),
        "the full maps were not logged"
    );

    let (mut in_kernel, mut in_userspace) = (Expect::default(), Expect::default());
    for (k, channel) in channels.iter().enumerate() {
        let tag = 0x40 + u8::try_from(k).expect("two channels");
        let outbound = messages(tag, 50);
        let inbound = messages(tag ^ 0x80, 50);
        client_to_peer(&mut client, channel, &outbound).expect("client -> peer");
        peer_to_client(&mut client, channel, &inbound).expect("peer -> client");
        let expect = if k == 0 {
            &mut in_kernel
        } else {
            &mut in_userspace
        };
        expect.record(false, channel, &outbound, &inbound);
    }
    let after = next_counters(&server).expect("counters after the media");
    assert_eq!(kernel_flow(&xdp_delta(&before, &after)), in_kernel.frames());
    assert_eq!(userspace_delta(&before, &after), in_userspace.data());
}
