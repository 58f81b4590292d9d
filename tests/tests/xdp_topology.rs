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

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rampart::stun::{AddressFamily, Attribute};
use rampart_tests::netns::run_in;
use rampart_tests::topology::{
    CLIENT_IF, EDGE_EXT_IF, EDGE_INT_IF, EdgeTopology, INTERNAL_NETS, PEER_IF, SenderChecksums,
};
use rampart_tests::{PASSWORD, Proto, Rampart, RampartConfig, Received, TurnClient, USER};
use serde_json::Value;

/// Messages each way on each channel.
const MESSAGES: usize = 200;
/// Data lengths, used in turn: a 1-byte message (a frame under Ethernet's 60-byte minimum),
/// lengths that are not multiples of 4 (ChannelData padding), a voice-sized and a
/// video-sized one.
const LENGTHS: [usize; 5] = [1, 3, 63, 160, 1201];
/// Messages in flight at most: the sender waits for the receiver beyond this, so no socket
/// buffer on the way can overflow and a loss is the relay's.
const WINDOW: usize = 16;
/// Bounds one direction of one channel's media (a healthy one takes milliseconds).
const PHASE_LIMIT: Duration = Duration::from_secs(10);
/// A phase that received nothing for this long has stalled: a failure, reported at once.
const STALL_LIMIT: Duration = Duration::from_secs(2);
/// Bounds the wait for the next `counters` line (logged every second when something changed).
const COUNTERS_WAIT: Duration = Duration::from_secs(5);
const FIRST_CHANNEL: u16 = 0x4000;

const ETHERNET: u64 = 14;
const UDP_HEADER: u64 = 8;
const CHANNEL_HEADER: u64 = 4;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// `[xdp] mode = "native"` on e0 and i0.
    Xdp,
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
    let mut config = RampartConfig::loopback(&[
        (Proto::Udp, topology.edge_external_ip(false)),
        (Proto::Udp, topology.edge_external_ip(true)),
    ])
    .with_xdp(
        match mode {
            Mode::Xdp | Mode::XdpPartialChecksums => "native",
            Mode::Userspace => "off",
        },
        &[EDGE_EXT_IF, EDGE_INT_IF],
    )
    .with_stats_interval(1)
    .in_netns(topology.edge.name());
    config.relay_ipv4 = match topology.edge_internal_ip(false) {
        IpAddr::V4(ip) => Some(ip),
        IpAddr::V6(_) => None,
    };
    config.relay_ipv6 = match topology.edge_internal_ip(true) {
        IpAddr::V6(ip) => Some(ip),
        IpAddr::V4(_) => None,
    };
    config.allowed_peer_networks = INTERNAL_NETS.iter().map(|n| (*n).to_owned()).collect();
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
                    let _ = writeln!(summary, "{}", diagnostics(&topology));
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

/// One channel of a case: its number, the peer's socket, the relay address it talks to.
struct Channel {
    number: u16,
    peer: UdpSocket,
    relayed: SocketAddr,
    peer_v6: bool,
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
            peer_v6,
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
    let ip_header = |v6: bool| if v6 { 40 } else { 20 };
    let mut expect = Expect::default();
    for channel in &channels {
        let tag = u8::try_from(index * 4 + usize::from(channel.number - FIRST_CHANNEL))
            .expect("small tag");
        let outbound = messages(tag, MESSAGES);
        let inbound = messages(tag ^ 0x80, MESSAGES);
        client_to_peer(&mut client, channel, &outbound)?;
        peer_to_client(&mut client, channel, &inbound)?;
        for m in &outbound {
            let len = m.len() as u64;
            expect.to_peer.add(
                len,
                ETHERNET + ip_header(case.client_v6) + UDP_HEADER + CHANNEL_HEADER + len,
            );
        }
        for m in &inbound {
            let len = m.len() as u64;
            expect.to_client.add(
                len,
                ETHERNET + ip_header(channel.peer_v6) + UDP_HEADER + len,
            );
        }
    }

    let after = next_counters(server)?;
    let relay = |v: &Value, key: &str| number(v, &["relay", key]);
    let delta = |key: &str| relay(&after, key).wrapping_sub(relay(&before, key));
    let userspace = Flow {
        to_peer: Count {
            packets: delta("to_peer_packets"),
            bytes: delta("to_peer_bytes"),
        },
        to_client: Count {
            packets: delta("to_client_packets"),
            bytes: delta("to_client_bytes"),
        },
    };
    let xdp_before = xdp_stats(&before);
    let xdp_delta: BTreeMap<String, (u64, u64)> = xdp_stats(&after)
        .into_iter()
        .map(|(name, (p, b))| {
            let (p0, b0) = xdp_before.get(&name).copied().unwrap_or_default();
            (name, (p - p0, b - b0))
        })
        .filter(|(_, (p, _))| *p > 0)
        .collect();
    let slot = |name: &str| {
        let (packets, bytes) = xdp_delta.get(name).copied().unwrap_or_default();
        Count { packets, bytes }
    };
    let kernel = Flow {
        to_peer: slot("forwarded_to_peer"),
        to_client: slot("forwarded_to_client"),
    };
    let account = format!(
        "{} message(s) each way on {} channel(s); userspace relay {userspace}; XDP {kernel}; \
         all XDP slots that moved: {xdp_delta:?}",
        MESSAGES * channels.len(),
        channels.len()
    );
    match mode {
        Mode::Xdp => {
            let zero = Flow::default();
            if userspace != zero {
                return Err(format!(
                    "userspace relayed media the kernel should have forwarded: {account}"
                ));
            }
            let frames = Flow {
                to_peer: Count {
                    packets: expect.to_peer.packets,
                    bytes: expect.to_peer.frame_bytes,
                },
                to_client: Count {
                    packets: expect.to_client.packets,
                    bytes: expect.to_client.frame_bytes,
                },
            };
            if kernel != frames {
                return Err(format!(
                    "the XDP counters do not account for the media (expected {frames}): {account}"
                ));
            }
        }
        Mode::XdpPartialChecksums => {
            let data = expect.data();
            let partial = slot("pass_checksum_partial").packets;
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

/// Client -> peer: ChannelData on `channel`, received by the peer from the relay address.
fn client_to_peer(
    client: &mut TurnClient,
    channel: &Channel,
    messages: &[Vec<u8>],
) -> Result<(), String> {
    let progress = Progress::new(messages.len());
    let what = format!("client -> peer on channel {:#06x}", channel.number);
    let (sent, got) = std::thread::scope(|scope| {
        let receiver = scope.spawn(|| {
            let mut got = Vec::new();
            let mut buf = vec![0u8; 2048];
            let _ = channel
                .peer
                .set_read_timeout(Some(Duration::from_millis(50)));
            while progress.keep_receiving() {
                if let Ok((n, from)) = channel.peer.recv_from(&mut buf) {
                    got.push((from, buf[..n].to_vec()));
                    progress.received();
                }
            }
            got
        });
        let sent = progress.send_all(messages, |m| {
            client
                .send_channel_data(channel.number, m)
                .map_err(|e| format!("{e:#}"))
        });
        (sent, receiver.join().expect("receiver thread"))
    });
    sent.map_err(|e| format!("{what}: {e}"))?;
    if let Some((from, _)) = got.iter().find(|(from, _)| *from != channel.relayed) {
        return Err(format!(
            "{what}: a datagram came from {from}, not from the relay address {}",
            channel.relayed
        ));
    }
    compare(
        &what,
        messages,
        got.into_iter().map(|(_, data)| data).collect(),
    )
}

/// Peer -> client: datagrams to the relay address, received as ChannelData on `channel`.
fn peer_to_client(
    client: &mut TurnClient,
    channel: &Channel,
    messages: &[Vec<u8>],
) -> Result<(), String> {
    let progress = Progress::new(messages.len());
    let what = format!("peer -> client on channel {:#06x}", channel.number);
    let (sent, got) = std::thread::scope(|scope| {
        let sender = scope.spawn(|| {
            progress.send_all(messages, |m| {
                channel
                    .peer
                    .send_to(m, channel.relayed)
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            })
        });
        let mut got = Vec::new();
        let mut problem = None;
        while progress.keep_receiving() {
            match client.recv(Duration::from_millis(50)) {
                Ok(Some(Received::Channel { channel: n, data })) if n == channel.number => {
                    got.push(data);
                    progress.received();
                }
                Ok(Some(other)) => {
                    problem = Some(format!("unexpected relayed message {other:?}"));
                    break;
                }
                Ok(None) => {}
                Err(e) => {
                    problem = Some(format!("{e:#}"));
                    break;
                }
            }
        }
        let sent = sender.join().expect("sender thread");
        (problem.map_or(sent, Err), got)
    });
    sent.map_err(|e| format!("{what}: {e}"))?;
    compare(&what, messages, got)
}

/// One direction of media between a sending and a receiving thread: how much arrived, and
/// when to give up.
struct Progress {
    expected: usize,
    received: AtomicUsize,
    sender_done: AtomicBool,
    started: Instant,
    /// Milliseconds after `started` of the last arrival (or of the start).
    last_arrival_ms: AtomicU64,
}

impl Progress {
    fn new(expected: usize) -> Self {
        Progress {
            expected,
            received: AtomicUsize::new(0),
            sender_done: AtomicBool::new(false),
            started: Instant::now(),
            last_arrival_ms: AtomicU64::new(0),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn received(&self) {
        self.received.fetch_add(1, Ordering::AcqRel);
        self.last_arrival_ms.store(self.now_ms(), Ordering::Release);
    }

    fn stalled(&self) -> bool {
        let quiet = self
            .now_ms()
            .saturating_sub(self.last_arrival_ms.load(Ordering::Acquire));
        Duration::from_millis(quiet) >= STALL_LIMIT || self.started.elapsed() >= PHASE_LIMIT
    }

    /// For the receiver: false once everything arrived, or the sender is done and nothing
    /// came for [`STALL_LIMIT`], or time is up.
    fn keep_receiving(&self) -> bool {
        self.received.load(Ordering::Acquire) < self.expected
            && !(self.sender_done.load(Ordering::Acquire) && self.stalled())
            && self.started.elapsed() < PHASE_LIMIT
    }

    /// Sends every message, keeping at most [`WINDOW`] unreceived; gives up when nothing
    /// arrives for [`STALL_LIMIT`].
    fn send_all(
        &self,
        messages: &[Vec<u8>],
        mut send: impl FnMut(&[u8]) -> Result<(), String>,
    ) -> Result<(), String> {
        let outcome = (|| {
            for (sent, message) in messages.iter().enumerate() {
                while sent - self.received.load(Ordering::Acquire).min(sent) >= WINDOW {
                    if self.stalled() {
                        return Err(format!(
                            "stalled: {sent} sent, {} received, nothing more within {STALL_LIMIT:?}",
                            self.received.load(Ordering::Acquire)
                        ));
                    }
                    std::thread::sleep(Duration::from_micros(200));
                }
                send(message)?;
            }
            Ok(())
        })();
        self.sender_done.store(true, Ordering::Release);
        outcome
    }
}

/// Every message arrived exactly once, bytes exact (in any order).
fn compare(what: &str, sent: &[Vec<u8>], mut got: Vec<Vec<u8>>) -> Result<(), String> {
    let count = got.len();
    let mut expected = sent.to_vec();
    expected.sort();
    got.sort();
    if got == expected {
        return Ok(());
    }
    let missing = expected.iter().filter(|m| !got.contains(m)).count();
    let unexpected = got.iter().filter(|m| !expected.contains(m)).count();
    let lengths: BTreeMap<usize, usize> =
        expected
            .iter()
            .filter(|m| !got.contains(m))
            .fold(BTreeMap::new(), |mut acc, m| {
                *acc.entry(m.len()).or_default() += 1;
                acc
            });
    Err(format!(
        "{what}: {count} of {} arrived; {missing} missing (by length: {lengths:?}), {unexpected} \
         not sent (or altered)",
        sent.len()
    ))
}

/// `count` messages of the lengths in [`LENGTHS`], each distinct: a tag, the index, a pattern.
fn messages(tag: u8, count: usize) -> Vec<Vec<u8>> {
    (0..count)
        .map(|i| {
            let len = LENGTHS[i % LENGTHS.len()];
            let index = u16::try_from(i).expect("few messages").to_be_bytes();
            let head = [tag, index[0], index[1]];
            (0..len)
                .map(|j| {
                    head.get(j)
                        .copied()
                        .unwrap_or_else(|| u8::try_from((i * 31 + j * 7) % 251).expect("below 251"))
                })
                .collect()
        })
        .collect()
}

/// Waits for a `counters` line logged after this call: it reflects everything the agent did
/// before the call (the line is computed and written under the agent's state lock).
fn next_counters(server: &Rampart) -> Result<Value, String> {
    let seen = server.counters().len();
    let deadline = Instant::now() + COUNTERS_WAIT;
    loop {
        let mut lines = server.counters();
        if lines.len() > seen {
            return Ok(lines.pop().expect("non-empty"));
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "no new `counters` line within {COUNTERS_WAIT:?} (--stats-interval 1)"
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn number(v: &Value, path: &[&str]) -> u64 {
    path.iter()
        .fold(v, |v, key| &v[*key])
        .as_u64()
        .unwrap_or_else(|| panic!("counters line without {path:?}: {v}"))
}

/// The `xdp` slots of a counters line: name -> (packets, bytes).
fn xdp_stats(v: &Value) -> BTreeMap<String, (u64, u64)> {
    v["xdp"]
        .as_array()
        .map(|slots| {
            slots
                .iter()
                .filter_map(|slot| {
                    Some((
                        slot[0].as_str()?.to_owned(),
                        (slot[1].as_u64()?, slot[2].as_u64()?),
                    ))
                })
                .collect()
        })
        .unwrap_or_default()
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Count {
    packets: u64,
    bytes: u64,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Flow {
    to_peer: Count,
    to_client: Count,
}

impl std::fmt::Display for Flow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "to peer {} pkts / {} B, to client {} pkts / {} B",
            self.to_peer.packets, self.to_peer.bytes, self.to_client.packets, self.to_client.bytes
        )
    }
}

#[derive(Default)]
struct Expected {
    packets: u64,
    data_bytes: u64,
    frame_bytes: u64,
}

impl Expected {
    fn add(&mut self, data: u64, frame: u64) {
        self.packets += 1;
        self.data_bytes += data;
        self.frame_bytes += frame;
    }
}

#[derive(Default)]
struct Expect {
    to_peer: Expected,
    to_client: Expected,
}

impl Expect {
    /// What userspace counts of the media: data bytes.
    fn data(&self) -> Flow {
        Flow {
            to_peer: Count {
                packets: self.to_peer.packets,
                bytes: self.to_peer.data_bytes,
            },
            to_client: Count {
                packets: self.to_client.packets,
                bytes: self.to_client.data_bytes,
            },
        }
    }
}

/// What the hosts' kernels saw, for a failure message: interface statistics (veth's XDP
/// counters too, when ethtool is installed) and the UDP counters of each namespace
/// (`InCsumErrors`: datagrams dropped for a bad checksum).
fn diagnostics(topology: &EdgeTopology) -> String {
    let mut out = String::from("----- diagnostics -----\n");
    let ethtool = rampart_tests::tools::find_on_path("ethtool").is_some();
    for (ns, dev) in [
        (&topology.client, CLIENT_IF),
        (&topology.edge, EDGE_EXT_IF),
        (&topology.edge, EDGE_INT_IF),
        (&topology.peer, PEER_IF),
    ] {
        let mut commands = vec![vec!["ip", "-s", "-d", "link", "show", "dev", dev]];
        // veth's per-queue XDP statistics (redirects, ndo_xdp_xmit, ring drops).
        if ethtool {
            commands.push(vec!["ethtool", "-S", dev]);
        }
        for command in commands {
            let output = std::process::Command::new("ip")
                .args(["netns", "exec", ns.name()])
                .args(&command)
                .output();
            if let Ok(o) = output {
                let _ = writeln!(
                    out,
                    "$ {} ({})\n{}{}",
                    command.join(" "),
                    ns.name(),
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                );
            }
        }
    }
    for ns in [&topology.client, &topology.edge, &topology.peer] {
        for file in ["/proc/net/snmp", "/proc/net/snmp6"] {
            let output = std::process::Command::new("ip")
                .args(["netns", "exec", ns.name(), "cat", file])
                .output();
            if let Ok(o) = output {
                let text = String::from_utf8_lossy(&o.stdout);
                let lines: Vec<&str> = text
                    .lines()
                    .filter(|l| l.starts_with("Udp:") || l.starts_with("Udp6"))
                    .collect();
                let _ = writeln!(out, "{} {file}:\n{}", ns.name(), lines.join("\n"));
            }
        }
    }
    out
}
