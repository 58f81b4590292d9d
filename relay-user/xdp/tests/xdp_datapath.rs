//! The XDP fast path, byte for byte, in the kernel.
//!
//! Each test builds a network namespace of its own with two veth pairs (`ext0`: the client
//! side, the TURN server's addresses; `int0`: the peer side, the relay addresses), addresses,
//! routes and permanent neighbour entries, with forwarding on, loads the program, binds
//! channels through `rampart_xdp`, and runs the program on crafted frames with
//! `BPF_PROG_TEST_RUN` (`XdpProgram::test_run`) as if they had arrived on `ext0` or `int0`.
//! Nothing is transmitted: test runs report the action instead of carrying it out. The
//! expected frames are built here independently, checksums computed in full.
//!
//! Every test runs twice, on both paths of the program's egress: with the next hops the agent
//! would cache in the bindings (resolved over netlink by `rampart_xdp::netlink::resolve`, as the
//! agent's cache does), and without any (`NextHop::NONE`: the program's `bpf_fib_lookup`).
//!
//! `bench_xdp` (ignored; `cargo xtask bench-xdp`) measures ns per packet the same way.
//!
//! Needs root. Without root the tests are skipped with a message, except under CI
//! (`CI=true`), where they fail: CI must exercise the real kernel path.

use std::{
    cell::Cell,
    fs::File,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use nix::{
    sched::{CloneFlags, setns},
    unistd::Uid,
};
use rampart_xdp::next_hop::RouteKey;
use rampart_xdp::{
    COUNTER_BATCH, ChannelBinding, ChannelCounters, Counter, Limit, MapSizes, NextHop, Stat,
    TestRunOutput, TotalDirection, XdpError, XdpProgram, Yardstick, action, monotonic_now_ns,
};

// ---------------------------------------------------------------------------------------------
// The topology
// ---------------------------------------------------------------------------------------------

const EXT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0x01];
const INT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x02, 0x01];
/// The client (and a peer on the client side) as the neighbour table knows them.
const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0x02];
const NEAR_PEER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0x03];
const PEER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x02, 0x02];
/// A next hop the relay may have (a router on the peer side); the frames' source MAC on input.
const BENCH_SERVER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0x10];
const BENCH_RELAY_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x02, 0x10];

const SERVER4: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 1);
const CLIENT4: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 2);
const NEAR_PEER4: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 3);
const RELAY4: Ipv4Addr = Ipv4Addr::new(10, 2, 0, 1);
const PEER4: Ipv4Addr = Ipv4Addr::new(10, 2, 0, 2);
/// On the peer subnet but without a neighbour entry.
const UNRESOLVED4: Ipv4Addr = Ipv4Addr::new(10, 2, 0, 9);
/// No route at all in the namespace (TEST-NET-1).
const UNROUTED4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);

const SERVER6: Ipv6Addr = Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, 1);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, 2);
const NEAR_PEER6: Ipv6Addr = Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, 3);
const RELAY6: Ipv6Addr = Ipv6Addr::new(0xfd00, 2, 0, 0, 0, 0, 0, 1);
const PEER6: Ipv6Addr = Ipv6Addr::new(0xfd00, 2, 0, 0, 0, 0, 0, 2);
const UNRESOLVED6: Ipv6Addr = Ipv6Addr::new(0xfd00, 2, 0, 0, 0, 0, 0, 9);

/// Bench-only hosts (neighbours, not local addresses: see `bench_xdp`).
const BENCH_SERVER4: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 16);
const BENCH_RELAY4: Ipv4Addr = Ipv4Addr::new(10, 2, 0, 16);
const BENCH_SERVER6: Ipv6Addr = Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, 0x10);
const BENCH_RELAY6: Ipv6Addr = Ipv6Addr::new(0xfd00, 2, 0, 0, 0, 0, 0, 0x10);

const TURN_PORT: u16 = 3478;
const CLIENT_PORT: u16 = 40000;
const PEER_PORT: u16 = 60000;

/// The interface indexes inside the namespace.
#[derive(Clone, Copy, Debug)]
struct Topology {
    ext: u32,
    int: u32,
    path: Path,
}

/// Which egress path of the program a test's bindings take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Path {
    /// Next hops cached in the bindings, as the agent resolves them.
    Cached,
    /// No next hop cached: `bpf_fib_lookup`.
    Fallback,
}

thread_local! {
    /// The path of the test running on this thread, for [`bind`].
    static PATH: Cell<(Path, [u32; 2])> = const { Cell::new((Path::Fallback, [0, 0])) };
}

/// [`with_topology`] on both paths, each in a namespace of its own.
fn on_both_paths(test: &str, body: impl Fn(&mut XdpProgram, Topology) + Send + Sync + 'static) {
    let body = Arc::new(body);
    for path in [Path::Cached, Path::Fallback] {
        let body = body.clone();
        with_topology(&format!("{test} ({path:?})"), path, move |xdp, t| {
            body(xdp, t)
        });
    }
}

/// Skips (or, under CI, fails) without root; otherwise runs `body` in a thread that has
/// entered a fresh namespace with the topology, and the program loaded there.
fn with_topology(
    test: &str,
    path: Path,
    body: impl FnOnce(&mut XdpProgram, Topology) + Send + 'static,
) {
    with_program(test, path, false, body)
}

/// [`with_topology`], with the program policing a total limit or not.
fn with_program(
    test: &str,
    path: Path,
    police_total: bool,
    body: impl FnOnce(&mut XdpProgram, Topology) + Send + 'static,
) {
    if !Uid::effective().is_root() {
        let why = "xdp_datapath needs root (CAP_BPF, CAP_NET_ADMIN, and `ip netns add`)";
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("{why}, and CI=true: CI must run it as root");
        }
        eprintln!("\n*** SKIPPED {test}: {why} ***\n");
        return;
    }
    let netns = Netns::create();
    netns.build_topology();
    let ns_path = format!("/run/netns/{}", netns.name);
    // Network namespaces are per thread: this thread enters it, the test's thread stays put.
    std::thread::spawn(move || {
        let ns = File::open(&ns_path).unwrap_or_else(|e| panic!("opening {ns_path}: {e}"));
        setns(&ns, CloneFlags::CLONE_NEWNET).unwrap_or_else(|e| panic!("setns({ns_path}): {e}"));
        let mut xdp = XdpProgram::load_with(MapSizes::default(), police_total)
            .unwrap_or_else(|e| panic!("{}", report(e)));
        let topology = Topology {
            ext: xdp
                .add_egress_interface("ext0")
                .unwrap_or_else(|e| panic!("{}", report(e))),
            int: xdp
                .add_egress_interface("int0")
                .unwrap_or_else(|e| panic!("{}", report(e))),
            path,
        };
        PATH.set((path, [topology.ext, topology.int]));
        body(&mut xdp, topology);
    })
    .join()
    .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
    drop(netns);
}

/// A network namespace that exists for the life of the value.
struct Netns {
    name: String,
}

impl Netns {
    fn create() -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let name = format!(
            "rampart-dp-{}-{}-{nanos}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        ip(&["netns", "add", &name]);
        Self { name }
    }

    fn ip(&self, args: &str) {
        let mut full = vec!["-n", &self.name];
        full.extend(args.split_whitespace());
        ip(&full);
    }

    fn sysctl(&self, setting: &str) {
        run(
            "ip",
            &["netns", "exec", &self.name, "sysctl", "-q", "-w", setting],
        );
    }

    fn build_topology(&self) {
        // Forwarding on: bpf_fib_lookup answers as for a forwarded packet.
        self.sysctl("net.ipv4.conf.all.forwarding=1");
        self.sysctl("net.ipv4.conf.default.forwarding=1");
        self.sysctl("net.ipv6.conf.all.forwarding=1");
        self.sysctl("net.ipv6.conf.default.forwarding=1");
        self.ip("link set lo up");
        for (dev, peer, mac) in [("ext0", "ext1", EXT_MAC), ("int0", "int1", INT_MAC)] {
            self.ip(&format!("link add {dev} type veth peer name {peer}"));
            self.ip(&format!("link set {dev} address {}", mac_str(mac)));
            self.ip(&format!("link set {dev} up"));
            self.ip(&format!("link set {peer} up"));
        }
        self.ip(&format!("addr add {SERVER4}/24 dev ext0"));
        self.ip(&format!("-6 addr add {SERVER6}/64 dev ext0 nodad"));
        self.ip(&format!("addr add {RELAY4}/24 dev int0"));
        self.ip(&format!("-6 addr add {RELAY6}/64 dev int0 nodad"));
        let neighbours: [(IpAddr, [u8; 6], &str); 10] = [
            (CLIENT4.into(), CLIENT_MAC, "ext0"),
            (CLIENT6.into(), CLIENT_MAC, "ext0"),
            (NEAR_PEER4.into(), NEAR_PEER_MAC, "ext0"),
            (NEAR_PEER6.into(), NEAR_PEER_MAC, "ext0"),
            (PEER4.into(), PEER_MAC, "int0"),
            (PEER6.into(), PEER_MAC, "int0"),
            (BENCH_SERVER4.into(), BENCH_SERVER_MAC, "ext0"),
            (BENCH_SERVER6.into(), BENCH_SERVER_MAC, "ext0"),
            (BENCH_RELAY4.into(), BENCH_RELAY_MAC, "int0"),
            (BENCH_RELAY6.into(), BENCH_RELAY_MAC, "int0"),
        ];
        for (addr, mac, dev) in neighbours {
            self.ip(&format!(
                "neigh replace {addr} lladdr {} dev {dev} nud permanent",
                mac_str(mac)
            ));
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn mac_str(mac: [u8; 6]) -> String {
    mac.map(|b| format!("{b:02x}")).join(":")
}

fn ip(args: &[&str]) {
    run("ip", args);
}

/// Runs a command; panics with its stderr if it fails.
fn run(program: &str, args: &[&str]) {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("running `{program}` (iproute2/procps; `cargo xtask setup`): {e}")
        });
    assert!(
        out.status.success(),
        "`{program} {}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn report(e: XdpError) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(cause) = source {
        text.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    text
}

// ---------------------------------------------------------------------------------------------
// Frames, built independently of the program (full checksums)
// ---------------------------------------------------------------------------------------------

/// How the UDP checksum field of a built frame is filled.
#[derive(Clone, Copy, PartialEq, Eq)]
enum UdpCheck {
    Full,
    /// 0: no checksum (IPv4 only).
    Zero,
}

/// An Ethernet + IP + UDP frame. IPv4 headers carry `ident`/`df` as given.
#[derive(Clone)]
struct Udp {
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: SocketAddr,
    dst: SocketAddr,
    tos: u8,
    ttl: u8,
    ident: u16,
    df: bool,
    check: UdpCheck,
    payload: Vec<u8>,
}

impl Udp {
    fn new(src: SocketAddr, dst: SocketAddr, payload: Vec<u8>) -> Self {
        Self {
            src_mac: [0x02, 0, 0, 0, 0xee, 0xee],
            dst_mac: [0x02, 0, 0, 0, 0xdd, 0xdd],
            src,
            dst,
            // DSCP EF + ECT(0): both must be carried over.
            tos: 0xba,
            ttl: 64,
            ident: 0x1234,
            df: false,
            check: UdpCheck::Full,
            payload,
        }
    }

    fn macs(mut self, src: [u8; 6], dst: [u8; 6]) -> Self {
        self.src_mac = src;
        self.dst_mac = dst;
        self
    }

    /// What the program sends for this datagram: a fresh IPv4 header has identification 0
    /// and DF; the TTL is one less.
    fn relayed(mut self) -> Self {
        self.ident = 0;
        self.df = true;
        self.ttl -= 1;
        self
    }

    fn build(&self) -> Vec<u8> {
        let mut udp = Vec::new();
        udp.extend_from_slice(&self.src.port().to_be_bytes());
        udp.extend_from_slice(&self.dst.port().to_be_bytes());
        udp.extend_from_slice(&((8 + self.payload.len()) as u16).to_be_bytes());
        udp.extend_from_slice(&[0, 0]);
        udp.extend_from_slice(&self.payload);
        if self.check == UdpCheck::Full {
            let check = udp_checksum(self.src.ip(), self.dst.ip(), &udp);
            udp[6..8].copy_from_slice(&check.to_be_bytes());
        }

        let mut frame = Vec::new();
        frame.extend_from_slice(&self.dst_mac);
        frame.extend_from_slice(&self.src_mac);
        match (self.src.ip(), self.dst.ip()) {
            (IpAddr::V4(src), IpAddr::V4(dst)) => {
                frame.extend_from_slice(&0x0800u16.to_be_bytes());
                let mut h = vec![0x45, self.tos];
                h.extend_from_slice(&((20 + udp.len()) as u16).to_be_bytes());
                h.extend_from_slice(&self.ident.to_be_bytes());
                h.extend_from_slice(&(if self.df { 0x4000u16 } else { 0 }).to_be_bytes());
                h.extend_from_slice(&[self.ttl, 17, 0, 0]);
                h.extend_from_slice(&src.octets());
                h.extend_from_slice(&dst.octets());
                let check = internet_checksum(&h);
                h[10..12].copy_from_slice(&check.to_be_bytes());
                frame.extend_from_slice(&h);
            }
            (IpAddr::V6(src), IpAddr::V6(dst)) => {
                frame.extend_from_slice(&0x86ddu16.to_be_bytes());
                let vtcfl = (6u32 << 28) | (u32::from(self.tos) << 20);
                frame.extend_from_slice(&vtcfl.to_be_bytes());
                frame.extend_from_slice(&(udp.len() as u16).to_be_bytes());
                frame.extend_from_slice(&[17, self.ttl]);
                frame.extend_from_slice(&src.octets());
                frame.extend_from_slice(&dst.octets());
            }
            _ => panic!("mixed families in one datagram"),
        }
        frame.extend_from_slice(&udp);
        frame
    }
}

/// RFC 1071 over `bytes` (odd tail padded with 0).
fn internet_checksum(bytes: &[u8]) -> u16 {
    let mut sum: u64 = 0;
    for chunk in bytes.chunks(2) {
        let word = u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]);
        sum += u64::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The UDP checksum of `udp` (checksum field 0) between `src` and `dst`; 0 sent as 0xFFFF.
fn udp_checksum(src: IpAddr, dst: IpAddr, udp: &[u8]) -> u16 {
    let mut pseudo = Vec::new();
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            pseudo.extend_from_slice(&s.octets());
            pseudo.extend_from_slice(&d.octets());
            pseudo.extend_from_slice(&[0, 17]);
            pseudo.extend_from_slice(&(udp.len() as u16).to_be_bytes());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            pseudo.extend_from_slice(&s.octets());
            pseudo.extend_from_slice(&d.octets());
            pseudo.extend_from_slice(&(udp.len() as u32).to_be_bytes());
            pseudo.extend_from_slice(&[0, 0, 0, 17]);
        }
        _ => panic!("mixed families"),
    }
    pseudo.extend_from_slice(udp);
    match internet_checksum(&pseudo) {
        0 => 0xffff,
        check => check,
    }
}

/// ChannelData: header, data, then `padding` bytes.
fn channel_data(channel: u16, data: &[u8], padding: &[u8]) -> Vec<u8> {
    let mut out = channel.to_be_bytes().to_vec();
    out.extend_from_slice(&(data.len() as u16).to_be_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(padding);
    out
}

/// Deterministic, not all-zero data (so a byte in the wrong place shows).
fn data(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes
        .chunks(16)
        .map(|line| {
            line.iter()
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[track_caller]
fn assert_frame(what: &str, got: &TestRunOutput, action: u32, expected: &[u8]) {
    let first_diff = got
        .frame
        .iter()
        .zip(expected)
        .position(|(a, b)| a != b)
        .unwrap_or(got.frame.len().min(expected.len()));
    assert!(
        got.action == action && got.frame == expected,
        "{what}: action {} (expected {action}), {} bytes (expected {}), first difference at \
         byte {first_diff}\n--- got:\n{}\n--- expected:\n{}",
        got.action,
        got.frame.len(),
        expected.len(),
        hex(&got.frame),
        hex(expected)
    );
}

fn run_on(xdp: &XdpProgram, frame: &[u8], ingress: u32) -> TestRunOutput {
    xdp.test_run(frame, ingress, 1)
        .unwrap_or_else(|e| panic!("{}", report(e)))
}

// ---------------------------------------------------------------------------------------------
// Bindings
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

fn addr(family: Family, v4: Ipv4Addr, v6: Ipv6Addr, port: u16) -> SocketAddr {
    match family {
        Family::V4 => SocketAddr::new(v4.into(), port),
        Family::V6 => SocketAddr::new(v6.into(), port),
    }
}

/// A channel between a client of `client` family and a peer of `peer` family; `n`
/// distinguishes bindings (relay port, channel, counter id).
fn binding(client: Family, peer: Family, n: u16) -> ChannelBinding {
    ChannelBinding {
        client: addr(client, CLIENT4, CLIENT6, CLIENT_PORT),
        server: addr(client, SERVER4, SERVER6, TURN_PORT),
        relay: addr(peer, RELAY4, RELAY6, 50000 + n),
        peer: addr(peer, PEER4, PEER6, PEER_PORT),
        channel: 0x4000 + n,
        counter_id: u32::from(n),
        expires_ns: monotonic_now_ns() + 600_000_000_000,
        to_peer: NextHop::NONE,
        to_client: NextHop::NONE,
        limit: Limit::NONE,
        budget_id: 0,
        budget_generation: 0,
    }
}

/// Binds with the next hops of this thread's [`Path`].
fn bind(xdp: &mut XdpProgram, binding: &ChannelBinding) {
    xdp.bind_channel(&with_next_hops(binding))
        .unwrap_or_else(|e| panic!("{}", report(e)));
}

/// `binding` with the next hops the agent would cache on the cached path, none on the other.
fn with_next_hops(binding: &ChannelBinding) -> ChannelBinding {
    let (path, egress) = PATH.get();
    let resolve = |src: SocketAddr, dst: SocketAddr| match path {
        Path::Fallback => NextHop::NONE,
        Path::Cached => rampart_xdp::netlink::resolve(
            RouteKey {
                src: src.ip(),
                dst: dst.ip(),
            },
            &egress,
        )
        .unwrap_or_else(|e| panic!("resolving {src} -> {dst} over netlink: {e}")),
    };
    ChannelBinding {
        to_peer: resolve(binding.relay, binding.peer),
        to_client: resolve(binding.server, binding.client),
        ..*binding
    }
}

/// The ChannelData frame a client sends for `binding`.
fn from_client(b: &ChannelBinding, payload: Vec<u8>) -> Udp {
    Udp::new(b.client, b.server, payload).macs(CLIENT_MAC, EXT_MAC)
}

/// The UDP frame the peer sends for `binding`.
fn from_peer(b: &ChannelBinding, payload: Vec<u8>) -> Udp {
    Udp::new(b.peer, b.relay, payload).macs(PEER_MAC, INT_MAC)
}

fn counters(xdp: &XdpProgram, id: u32) -> ChannelCounters {
    xdp.channel_counters(id)
        .unwrap_or_else(|e| panic!("{}", report(e)))
}

fn stats(xdp: &XdpProgram) -> Vec<(Stat, Counter)> {
    xdp.stats().unwrap_or_else(|e| panic!("{}", report(e)))
}

/// Packets counted per stat between two `stats` snapshots.
fn delta(before: &[(Stat, Counter)], after: &[(Stat, Counter)], stat: Stat) -> u64 {
    let get = |s: &[(Stat, Counter)]| s.iter().find(|(x, _)| *x == stat).unwrap().1.packets;
    get(after) - get(before)
}

const FAMILIES: [(Family, Family); 4] = [
    (Family::V4, Family::V4),
    (Family::V6, Family::V6),
    (Family::V4, Family::V6),
    (Family::V6, Family::V4),
];

// ---------------------------------------------------------------------------------------------
// Forwarding
// ---------------------------------------------------------------------------------------------

#[test]
fn forwards_both_directions_for_every_family_pair() {
    on_both_paths(
        "forwards_both_directions_for_every_family_pair",
        |xdp, t| {
            let before = stats(xdp);
            let mut to_peer = 0;
            let mut to_client = 0;
            for (n, (client, peer)) in FAMILIES.into_iter().enumerate() {
                let b = binding(client, peer, n as u16);
                bind(xdp, &b);
                let what = format!("{client:?} client, {peer:?} peer");
                let resolved = with_next_hops(&b);
                assert_eq!(
                    (resolved.to_peer.is_cached(), resolved.to_client.is_cached()),
                    (t.path == Path::Cached, t.path == Path::Cached),
                    "{what}: next hops {resolved:?}"
                );

                // Client -> peer, odd data with 3 non-zero padding bytes: header and padding go,
                // the data stays, the frame leaves int0 towards the peer.
                let payload = data(101, n as u8);
                let input = from_client(&b, channel_data(b.channel, &payload, &[0xaa, 0xbb, 0xcc]));
                let expected = Udp::new(b.relay, b.peer, payload.clone())
                    .macs(INT_MAC, PEER_MAC)
                    .relayed();
                let got = run_on(xdp, &input.build(), t.ext);
                assert_frame(
                    &format!("{what}: to peer, padded"),
                    &got,
                    action::REDIRECT,
                    &expected.build(),
                );
                to_peer += 1;

                // Client -> peer, a multiple of 4, no padding.
                let payload = data(160, 7);
                let input = from_client(&b, channel_data(b.channel, &payload, &[]));
                let expected = Udp::new(b.relay, b.peer, payload)
                    .macs(INT_MAC, PEER_MAC)
                    .relayed();
                let got = run_on(xdp, &input.build(), t.ext);
                assert_frame(
                    &format!("{what}: to peer"),
                    &got,
                    action::REDIRECT,
                    &expected.build(),
                );
                to_peer += 1;

                // Peer -> client, odd data: a ChannelData header in front, no padding.
                let payload = data(77, 3);
                let input = from_peer(&b, payload.clone());
                let expected = Udp::new(b.server, b.client, channel_data(b.channel, &payload, &[]))
                    .macs(EXT_MAC, CLIENT_MAC)
                    .relayed();
                let got = run_on(xdp, &input.build(), t.int);
                assert_frame(
                    &format!("{what}: to client"),
                    &got,
                    action::REDIRECT,
                    &expected.build(),
                );
                to_client += 1;

                // A tiny datagram in a minimum-size Ethernet frame: the trailer is not relayed.
                let payload = data(3, 9);
                let mut input = from_client(&b, channel_data(b.channel, &payload, &[0])).build();
                input.resize(input.len().max(60), 0);
                let expected = Udp::new(b.relay, b.peer, payload.clone())
                    .macs(INT_MAC, PEER_MAC)
                    .relayed();
                let got = run_on(xdp, &input, t.ext);
                assert_frame(
                    &format!("{what}: to peer, Ethernet trailer"),
                    &got,
                    action::REDIRECT,
                    &expected.build(),
                );
                to_peer += 1;
                let mut input = from_peer(&b, payload.clone()).build();
                input.resize(input.len().max(60), 0);
                let expected = Udp::new(b.server, b.client, channel_data(b.channel, &payload, &[]))
                    .macs(EXT_MAC, CLIENT_MAC)
                    .relayed();
                let got = run_on(xdp, &input, t.int);
                assert_frame(
                    &format!("{what}: to client, Ethernet trailer"),
                    &got,
                    action::REDIRECT,
                    &expected.build(),
                );
                to_client += 1;

                assert_eq!(
                    counters(xdp, b.counter_id),
                    ChannelCounters {
                        to_peer_packets: 3,
                        to_peer_bytes: 101 + 160 + 3,
                        to_client_packets: 2,
                        to_client_bytes: 77 + 3,
                        ..ChannelCounters::default()
                    },
                    "{what}: channel counters"
                );
            }
            let after = stats(xdp);
            assert_eq!(delta(&before, &after, Stat::ForwardedToPeer), to_peer);
            assert_eq!(delta(&before, &after, Stat::ForwardedToClient), to_client);
            assert_eq!(delta(&before, &after, Stat::Seen), to_peer + to_client);
            assert_eq!(delta(&before, &after, Stat::DropAfterRewrite), 0);
        },
    );
}

#[test]
fn zero_udp_checksum_stays_zero_over_ipv4_only() {
    on_both_paths("zero_udp_checksum_stays_zero_over_ipv4_only", |xdp, t| {
        let b = binding(Family::V4, Family::V4, 1);
        bind(xdp, &b);
        let payload = data(33, 1);

        let mut input = from_client(&b, channel_data(b.channel, &payload, &[1, 2, 3]));
        input.check = UdpCheck::Zero;
        let mut expected = Udp::new(b.relay, b.peer, payload.clone())
            .macs(INT_MAC, PEER_MAC)
            .relayed();
        expected.check = UdpCheck::Zero;
        let got = run_on(xdp, &input.build(), t.ext);
        assert_frame(
            "to peer without checksum",
            &got,
            action::REDIRECT,
            &expected.build(),
        );

        let mut input = from_peer(&b, payload.clone());
        input.check = UdpCheck::Zero;
        let mut expected = Udp::new(b.server, b.client, channel_data(b.channel, &payload, &[]))
            .macs(EXT_MAC, CLIENT_MAC)
            .relayed();
        expected.check = UdpCheck::Zero;
        let got = run_on(xdp, &input.build(), t.int);
        assert_frame(
            "to client without checksum",
            &got,
            action::REDIRECT,
            &expected.build(),
        );

        // To an IPv6 peer a checksum is mandatory: userspace computes it.
        let b6 = binding(Family::V4, Family::V6, 2);
        bind(xdp, &b6);
        let before = stats(xdp);
        let mut input = from_client(&b6, channel_data(b6.channel, &payload, &[]));
        input.check = UdpCheck::Zero;
        let frame = input.build();
        assert_frame(
            "v4 -> v6 without checksum",
            &run_on(xdp, &frame, t.ext),
            action::PASS,
            &frame,
        );
        let b6c = binding(Family::V6, Family::V4, 3);
        bind(xdp, &b6c);
        let mut input = from_peer(&b6c, payload.clone());
        input.check = UdpCheck::Zero;
        let frame = input.build();
        assert_frame(
            "v4 peer -> v6 client without checksum",
            &run_on(xdp, &frame, t.int),
            action::PASS,
            &frame,
        );
        let after = stats(xdp);
        assert_eq!(delta(&before, &after, Stat::PassChecksumZeroV6), 2);
    });
}

#[test]
fn transmits_back_out_of_the_ingress_interface() {
    on_both_paths("transmits_back_out_of_the_ingress_interface", |xdp, t| {
        for (n, family) in [Family::V4, Family::V6].into_iter().enumerate() {
            // A peer on the client side: both directions leave where they came in (XDP_TX).
            let mut b = binding(family, family, n as u16);
            b.peer = addr(family, NEAR_PEER4, NEAR_PEER6, PEER_PORT);
            bind(xdp, &b);
            let payload = data(50, 5);
            let input = from_client(&b, channel_data(b.channel, &payload, &[0, 0]));
            let expected = Udp::new(b.relay, b.peer, payload.clone())
                .macs(EXT_MAC, NEAR_PEER_MAC)
                .relayed();
            let got = run_on(xdp, &input.build(), t.ext);
            assert_frame(
                &format!("{family:?}: to peer"),
                &got,
                action::TX,
                &expected.build(),
            );

            let input = Udp::new(b.peer, b.relay, payload.clone()).macs(NEAR_PEER_MAC, EXT_MAC);
            let expected = Udp::new(b.server, b.client, channel_data(b.channel, &payload, &[]))
                .macs(EXT_MAC, CLIENT_MAC)
                .relayed();
            let got = run_on(xdp, &input.build(), t.ext);
            assert_frame(
                &format!("{family:?}: to client"),
                &got,
                action::TX,
                &expected.build(),
            );
        }
    });
}

// ---------------------------------------------------------------------------------------------
// Everything else goes to userspace, unchanged
// ---------------------------------------------------------------------------------------------

/// Runs `frame` and checks it is passed unchanged and counted in `stat`.
#[track_caller]
fn assert_passed(xdp: &XdpProgram, what: &str, frame: &[u8], ingress: u32, stat: Stat) {
    let before = stats(xdp);
    let got = run_on(xdp, frame, ingress);
    assert_frame(what, &got, action::PASS, frame);
    let after = stats(xdp);
    assert_eq!(
        delta(&before, &after, stat),
        1,
        "{what}: not counted in {stat:?}"
    );
    assert_eq!(delta(&before, &after, Stat::Seen), 1, "{what}: Seen");
}

#[test]
fn passes_what_it_does_not_own_unchanged() {
    on_both_paths("passes_what_it_does_not_own_unchanged", |xdp, t| {
        let b4 = binding(Family::V4, Family::V4, 1);
        let b6 = binding(Family::V6, Family::V6, 2);
        bind(xdp, &b4);
        bind(xdp, &b6);
        let good4 = from_client(&b4, channel_data(b4.channel, &data(40, 1), &[])).build();
        let good6 = from_client(&b6, channel_data(b6.channel, &data(40, 1), &[])).build();
        let peer4 = from_peer(&b4, data(40, 2)).build();
        // Sanity: the unmodified frames are forwarded.
        assert_eq!(run_on(xdp, &good4, t.ext).action, action::REDIRECT);
        assert_eq!(run_on(xdp, &good6, t.ext).action, action::REDIRECT);
        assert_eq!(run_on(xdp, &peer4, t.int).action, action::REDIRECT);

        // Short and truncated frames.
        assert_passed(
            xdp,
            "Ethernet header only",
            &good4[..14],
            t.ext,
            Stat::PassMalformed,
        );
        assert_passed(
            xdp,
            "truncated IPv4 header",
            &good4[..30],
            t.ext,
            Stat::PassMalformed,
        );
        assert_passed(
            xdp,
            "truncated IPv6 header",
            &good6[..50],
            t.ext,
            Stat::PassMalformed,
        );
        assert_passed(
            xdp,
            "truncated UDP header",
            &good4[..38],
            t.ext,
            Stat::PassMalformed,
        );
        assert_passed(
            xdp,
            "truncated datagram",
            &good4[..good4.len() - 1],
            t.ext,
            Stat::PassMalformed,
        );
        assert_passed(
            xdp,
            "truncated IPv6 datagram",
            &good6[..good6.len() - 1],
            t.ext,
            Stat::PassMalformed,
        );

        // Inconsistent headers.
        let mut f = good4.clone();
        f[24] ^= 0x01; // IPv4 header checksum
        assert_passed(
            xdp,
            "bad IPv4 header checksum",
            &f,
            t.ext,
            Stat::PassMalformed,
        );
        let mut f = good4.clone();
        let udp_len = u16::from_be_bytes([f[38], f[39]]);
        f[38..40].copy_from_slice(&(udp_len - 1).to_be_bytes());
        assert_passed(
            xdp,
            "UDP length != IP payload",
            &f,
            t.ext,
            Stat::PassMalformed,
        );
        let mut f = good4.clone();
        f[14] = 0x65; // version 6 in an IPv4 frame
        assert_passed(xdp, "IP version mismatch", &f, t.ext, Stat::PassMalformed);

        // ChannelData lengths.
        let over = {
            let mut p = channel_data(b4.channel, &data(40, 1), &[]);
            p[2..4].copy_from_slice(&41u16.to_be_bytes());
            from_client(&b4, p).build()
        };
        assert_passed(
            xdp,
            "ChannelData length > datagram",
            &over,
            t.ext,
            Stat::PassChannelLength,
        );
        let trailing = from_client(&b4, channel_data(b4.channel, &data(40, 1), &[0; 4])).build();
        assert_passed(
            xdp,
            "4 bytes after ChannelData",
            &trailing,
            t.ext,
            Stat::PassChannelLength,
        );
        let short = from_client(&b4, vec![0x40, 0x01, 0x00]).build();
        assert_passed(
            xdp,
            "3-byte payload to the server",
            &short,
            t.ext,
            Stat::PassNotOurs,
        );

        // Fragments, options, extension headers, VLAN.
        let mut f = good4.clone();
        f[20] |= 0x20; // MF
        fix_ipv4_checksum(&mut f);
        assert_passed(xdp, "IPv4 first fragment", &f, t.ext, Stat::PassFragment);
        let mut f = good4.clone();
        f[21] = 0x10; // offset
        fix_ipv4_checksum(&mut f);
        assert_passed(xdp, "IPv4 later fragment", &f, t.ext, Stat::PassFragment);
        let mut f = good6.clone();
        f[20] = 44; // next header: fragment
        assert_passed(xdp, "IPv6 fragment header", &f, t.ext, Stat::PassFragment);
        let mut f = good6.clone();
        f[20] = 0; // hop-by-hop options
        assert_passed(xdp, "IPv6 extension header", &f, t.ext, Stat::PassIpOptions);
        let f = with_ipv4_option(&good4);
        assert_passed(xdp, "IPv4 options", &f, t.ext, Stat::PassIpOptions);
        let mut f = good4[..12].to_vec();
        f.extend_from_slice(&[0x81, 0x00, 0x00, 0x05]);
        f.extend_from_slice(&good4[12..]);
        assert_passed(xdp, "VLAN tag", &f, t.ext, Stat::PassVlan);

        // Not ours.
        let mut f = good4.clone();
        f[23] = 1; // ICMP
        fix_ipv4_checksum(&mut f);
        assert_passed(xdp, "ICMP", &f, t.ext, Stat::PassNotOurs);
        let mut f = good4.clone();
        f[12..14].copy_from_slice(&[0x08, 0x06]); // ARP
        assert_passed(xdp, "ARP", &f, t.ext, Stat::PassNotOurs);
        let stun = {
            let mut p = vec![0x00, 0x01, 0x00, 0x00, 0x21, 0x12, 0xa4, 0x42];
            p.extend_from_slice(&data(12, 0));
            from_client(&b4, p).build()
        };
        assert_passed(xdp, "STUN Binding request", &stun, t.ext, Stat::PassStun);
        let unbound = from_client(&b4, channel_data(0x4fff, &data(40, 1), &[])).build();
        assert_passed(
            xdp,
            "unbound channel",
            &unbound,
            t.ext,
            Stat::PassUnboundChannel,
        );
        let mut stranger = b4;
        stranger.client = SocketAddr::new(CLIENT4.into(), CLIENT_PORT + 1);
        let f = from_client(&stranger, channel_data(b4.channel, &data(40, 1), &[])).build();
        assert_passed(
            xdp,
            "bound channel, other client port",
            &f,
            t.ext,
            Stat::PassUnboundChannel,
        );
        let mut stranger = b4;
        stranger.peer = SocketAddr::new(PEER4.into(), PEER_PORT + 1);
        let f = from_peer(&stranger, data(40, 0x80)).build();
        assert_passed(xdp, "unknown peer 5-tuple", &f, t.int, Stat::PassNotOurs);
        let mut f = from_peer(&b4, data(40, 0x80));
        f.dst = SocketAddr::new(RELAY4.into(), 50999);
        assert_passed(
            xdp,
            "unallocated relay port",
            &f.build(),
            t.int,
            Stat::PassNotOurs,
        );

        // IPv4-mapped IPv6 addresses on the wire.
        let mut f = good6.clone();
        f[22..34].copy_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff]);
        assert_passed(
            xdp,
            "IPv4-mapped source in IPv6",
            &f,
            t.ext,
            Stat::PassMalformed,
        );

        // TTL exhausted.
        let mut f = from_client(&b4, channel_data(b4.channel, &data(40, 1), &[]));
        f.ttl = 1;
        assert_passed(xdp, "TTL 1", &f.build(), t.ext, Stat::PassTtl);
        let mut f = from_peer(&b6, data(40, 1));
        f.ttl = 1;
        assert_passed(xdp, "hop limit 1", &f.build(), t.int, Stat::PassTtl);

        // IPv6 without a UDP checksum is invalid (RFC 8200 §8.1): the stack drops it.
        let mut f = from_client(&b6, channel_data(b6.channel, &data(40, 1), &[]));
        f.check = UdpCheck::Zero;
        assert_passed(
            xdp,
            "IPv6 with UDP checksum 0",
            &f.build(),
            t.ext,
            Stat::PassMalformed,
        );

        // Frames are untouched by all this: the good ones are still forwarded.
        assert_eq!(run_on(xdp, &good4, t.ext).action, action::REDIRECT);
    });
}

fn fix_ipv4_checksum(frame: &mut [u8]) {
    frame[24] = 0;
    frame[25] = 0;
    let check = internet_checksum(&frame[14..34]);
    frame[24..26].copy_from_slice(&check.to_be_bytes());
}

/// `frame` with a 4-byte IPv4 option (NOP x 4): IHL 6.
fn with_ipv4_option(frame: &[u8]) -> Vec<u8> {
    let mut f = frame[..34].to_vec();
    f.extend_from_slice(&[1, 1, 1, 1]);
    f.extend_from_slice(&frame[34..]);
    f[14] = 0x46;
    let total = u16::from_be_bytes([f[16], f[17]]) + 4;
    f[16..18].copy_from_slice(&total.to_be_bytes());
    f[24] = 0;
    f[25] = 0;
    let check = internet_checksum(&f[14..38]);
    f[24..26].copy_from_slice(&check.to_be_bytes());
    f
}

#[test]
fn expired_bindings_are_not_used() {
    on_both_paths("expired_bindings_are_not_used", |xdp, t| {
        let mut b = binding(Family::V4, Family::V6, 1);
        // Expires right away, in kernel time: the program reads the coarse clock, which
        // lags by up to a tick (10 ms at HZ=100, the slowest), so it is given two.
        b.expires_ns = monotonic_now_ns();
        bind(xdp, &b);
        std::thread::sleep(Duration::from_millis(20));
        let to_peer = from_client(&b, channel_data(b.channel, &data(40, 1), &[])).build();
        assert_passed(
            xdp,
            "expired, client side",
            &to_peer,
            t.ext,
            Stat::PassExpired,
        );
        let to_client = from_peer(&b, data(40, 1)).build();
        assert_passed(
            xdp,
            "expired, peer side",
            &to_client,
            t.int,
            Stat::PassExpired,
        );

        // A refresh brings it back, counters kept.
        b.expires_ns = monotonic_now_ns() + 60_000_000_000;
        bind(xdp, &b);
        assert_eq!(run_on(xdp, &to_peer, t.ext).action, action::REDIRECT);
        b.expires_ns = monotonic_now_ns() + 60_000_000_000;
        bind(xdp, &b);
        assert_eq!(run_on(xdp, &to_client, t.int).action, action::REDIRECT);
        let c = counters(xdp, b.counter_id);
        assert_eq!((c.to_peer_packets, c.to_client_packets), (1, 1));
        // What reports read: every slot, in more than one batch, with the same counts.
        let slots = b.counter_id + COUNTER_BATCH + 1;
        let batch = xdp
            .channel_counters_batch(slots)
            .unwrap_or_else(|e| panic!("{}", report(e)));
        assert_eq!(batch.len(), slots as usize, "every slot, across batches");
        assert_eq!(batch[b.counter_id as usize], c);
    });
}

#[test]
fn a_limited_channel_is_cut_to_its_burst_and_counts_what_it_dropped() {
    on_both_paths(
        "a_limited_channel_is_cut_to_its_burst_and_counts_what_it_dropped",
        |xdp, t| {
            // 16 kbit/s (2 bytes per ms) with a 3000-byte burst: twenty 1000-byte datagrams
            // each way, back to back, pass three (what a stall of the test adds is bytes, not
            // a datagram), the rest is dropped and counted on the channel, each direction on
            // its own.
            let mut b = binding(Family::V4, Family::V4, 3);
            b.limit = Limit::new(16_000, 3000);
            (b.budget_id, b.budget_generation) = (7, 1);
            bind(xdp, &b);
            let before = stats(xdp);
            let to_peer = from_client(&b, channel_data(b.channel, &data(1000, 1), &[])).build();
            let to_client = from_peer(&b, data(1000, 2)).build();
            let mut passed = [0u64; 2];
            for _ in 0..20 {
                for (direction, frame, ingress) in [(0, &to_peer, t.ext), (1, &to_client, t.int)] {
                    match run_on(xdp, frame, ingress).action {
                        action::REDIRECT => passed[direction] += 1,
                        action::DROP => {}
                        other => panic!("action {other} for a limited channel"),
                    }
                }
            }
            assert_eq!(
                passed,
                [3, 3],
                "datagrams passed a 3000-byte burst each way"
            );
            let c = counters(xdp, b.counter_id);
            assert_eq!(
                (c.to_peer_packets, c.to_client_packets),
                (passed[0], passed[1])
            );
            assert_eq!(
                (c.to_peer_over_limit_packets, c.to_client_over_limit_packets),
                (20 - passed[0], 20 - passed[1])
            );
            assert_eq!(c.to_peer_over_limit_bytes, (20 - passed[0]) * 1000);
            let after = stats(xdp);
            assert_eq!(
                delta(&before, &after, Stat::DropOverLimit),
                40 - passed[0] - passed[1]
            );

            // The slot given to another allocation (a new generation) starts with a full burst.
            bind(
                xdp,
                &ChannelBinding {
                    budget_generation: 2,
                    ..b
                },
            );
            assert_eq!(run_on(xdp, &to_peer, t.ext).action, action::REDIRECT);

            // Without a limit the same binding forwards everything.
            bind(
                xdp,
                &ChannelBinding {
                    limit: Limit::NONE,
                    ..b
                },
            );
            for _ in 0..20 {
                assert_eq!(run_on(xdp, &to_peer, t.ext).action, action::REDIRECT);
            }
        },
    );
}

#[test]
fn each_cpu_is_held_to_its_share_of_the_total() {
    with_program(
        "each_cpu_is_held_to_its_share_of_the_total",
        Path::Cached,
        true,
        |xdp, t| {
            // Unlimited until the agent gives the CPUs their shares: nothing is dropped.
            let b = binding(Family::V4, Family::V4, 4);
            bind(xdp, &b);
            let to_peer = from_client(&b, channel_data(b.channel, &data(1000, 1), &[])).build();
            let to_client = from_peer(&b, data(1000, 2)).build();
            for _ in 0..5 {
                assert_eq!(run_on(xdp, &to_peer, t.ext).action, action::REDIRECT);
            }
            // 16 kbit/s per CPU with a 3000-byte burst, towards the peer only. The thread is
            // pinned to the CPU it is on: each CPU polices its own share, so a thread moving
            // between two would pass two bursts.
            let cpu = nix::sched::sched_getcpu().unwrap_or_else(|e| panic!("sched_getcpu: {e}"));
            let mut only = nix::sched::CpuSet::new();
            only.set(cpu).unwrap_or_else(|e| panic!("CPU {cpu}: {e}"));
            nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &only)
                .unwrap_or_else(|e| panic!("pinning the test to CPU {cpu}: {e}"));
            let cpus = xdp
                .total_shares(TotalDirection::ToPeer)
                .unwrap_or_else(|e| panic!("{}", report(e)))
                .len();
            xdp.set_total_shares(
                TotalDirection::ToPeer,
                &vec![Limit::new(16_000, 3000); cpus],
            )
            .unwrap_or_else(|e| panic!("{}", report(e)));
            let before = stats(xdp);
            let passed = (0..20)
                .filter(|_| run_on(xdp, &to_peer, t.ext).action == action::REDIRECT)
                .count() as u64;
            assert_eq!(passed, 3, "datagrams passed a 3000-byte share");
            assert_eq!(
                delta(&before, &stats(xdp), Stat::DropOverTotal),
                20 - passed
            );
            // Each CPU counts what it was offered, passed or not: the agent's measure of its
            // demand (5 + 20 datagrams of 1000 bytes, on whichever CPUs ran them).
            let offered: u64 = xdp
                .total_shares(TotalDirection::ToPeer)
                .unwrap_or_else(|e| panic!("{}", report(e)))
                .iter()
                .map(|share| share.offered_bytes)
                .sum();
            assert_eq!(offered, 25 * 1000);
            // The other direction has no share set: unlimited.
            for _ in 0..20 {
                assert_eq!(run_on(xdp, &to_client, t.int).action, action::REDIRECT);
            }
        },
    );
}

// ---------------------------------------------------------------------------------------------
// Egress
// ---------------------------------------------------------------------------------------------

#[test]
fn egress_failures_leave_the_frame_to_userspace() {
    on_both_paths("egress_failures_leave_the_frame_to_userspace", |xdp, t| {
        // No neighbour entry for the peer: the stack resolves it, userspace relays meanwhile.
        for (n, (peer4, peer6)) in [(UNRESOLVED4, UNRESOLVED6)].into_iter().enumerate() {
            for family in [Family::V4, Family::V6] {
                let mut b = binding(family, family, (n * 2) as u16 + family as u16);
                b.peer = addr(family, peer4, peer6, PEER_PORT);
                bind(xdp, &b);
                let f = from_client(&b, channel_data(b.channel, &data(40, 1), &[])).build();
                assert_passed(
                    xdp,
                    &format!("{family:?}: no neighbour"),
                    &f,
                    t.ext,
                    Stat::PassFibMiss,
                );
            }
        }
        // No route at all.
        let mut b = binding(Family::V4, Family::V4, 10);
        b.peer = SocketAddr::new(UNROUTED4.into(), PEER_PORT);
        bind(xdp, &b);
        let f = from_client(&b, channel_data(b.channel, &data(40, 1), &[])).build();
        assert_passed(xdp, "no route", &f, t.ext, Stat::PassFibMiss);

        // The egress interface is not in the devmap. (The agent caches only next hops out of
        // registered interfaces, so this is the fallback's case.)
        if t.path == Path::Cached {
            return;
        }
        let b = binding(Family::V4, Family::V4, 11);
        bind(xdp, &b);
        let f = from_client(&b, channel_data(b.channel, &data(40, 1), &[])).build();
        assert_eq!(run_on(xdp, &f, t.ext).action, action::REDIRECT);
        xdp.remove_egress_ifindex(t.int)
            .unwrap_or_else(|e| panic!("{}", report(e)));
        assert_passed(xdp, "egress not registered", &f, t.ext, Stat::PassNoEgress);
        xdp.add_egress_ifindex(t.int)
            .unwrap_or_else(|e| panic!("{}", report(e)));
        assert_eq!(run_on(xdp, &f, t.ext).action, action::REDIRECT);
    });
}

#[test]
fn mtu_and_forwarding_are_the_kernels_to_enforce() {
    if !Uid::effective().is_root() {
        // with_topology reports the skip.
        with_topology(
            "mtu_and_forwarding_are_the_kernels_to_enforce",
            Path::Fallback,
            |_, _| {},
        );
        return;
    }
    for path in [Path::Cached, Path::Fallback] {
        mtu_and_forwarding_on(path);
    }
}

fn mtu_and_forwarding_on(path: Path) {
    // This test changes the topology, so it drives the namespace itself.
    let netns = Netns::create();
    netns.build_topology();
    netns.ip("link set int0 mtu 1280");
    let name = netns.name.clone();
    let ns_path = format!("/run/netns/{name}");
    std::thread::spawn(move || {
        let ns = File::open(&ns_path).unwrap();
        setns(&ns, CloneFlags::CLONE_NEWNET).unwrap();
        let mut xdp = XdpProgram::load().unwrap_or_else(|e| panic!("{}", report(e)));
        let ext = xdp.add_egress_interface("ext0").unwrap();
        let int = xdp.add_egress_interface("int0").unwrap();
        PATH.set((path, [ext, int]));

        // IPv4 client, IPv6 peer: the datagram grows by 16 bytes and no longer fits int0 (the
        // cached next hop carries int0's MTU; the fallback's FIB lookup checks it).
        let b = binding(Family::V4, Family::V6, 1);
        bind(&mut xdp, &b);
        let fits = from_client(&b, channel_data(b.channel, &data(1232, 1), &[])).build();
        assert_eq!(
            run_on(&xdp, &fits, ext).action,
            action::REDIRECT,
            "{path:?}: 40 + 8 + 1232 = 1280"
        );
        let too_big = from_client(&b, channel_data(b.channel, &data(1233, 1), &[0, 0, 0])).build();
        assert_passed(
            &xdp,
            &format!("{path:?}: over the egress MTU"),
            &too_big,
            ext,
            Stat::PassFragNeeded,
        );

        // Forwarding off on the ingress interface: the FIB lookup refuses. A cached next hop
        // needs no FIB lookup, and so no forwarding.
        run(
            "ip",
            &[
                "netns",
                "exec",
                &name,
                "sysctl",
                "-q",
                "-w",
                "net.ipv4.conf.ext0.forwarding=0",
            ],
        );
        let b4 = binding(Family::V4, Family::V4, 2);
        bind(&mut xdp, &b4);
        let f = from_client(&b4, channel_data(b4.channel, &data(40, 1), &[])).build();
        match path {
            Path::Fallback => assert_passed(
                &xdp,
                "forwarding disabled",
                &f,
                ext,
                Stat::PassForwardingDisabled,
            ),
            Path::Cached => assert_eq!(run_on(&xdp, &f, ext).action, action::REDIRECT),
        }
    })
    .join()
    .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
    drop(netns);
}

// ---------------------------------------------------------------------------------------------
// The map API
// ---------------------------------------------------------------------------------------------

#[test]
fn bindings_are_validated_and_unbinding_returns_the_counters() {
    on_both_paths(
        "bindings_are_validated_and_unbinding_returns_the_counters",
        |xdp, t| {
            let good = binding(Family::V4, Family::V6, 1);
            for (bad, why) in [
                (
                    ChannelBinding {
                        channel: 0x3fff,
                        ..good
                    },
                    "channel below 0x4000",
                ),
                (
                    ChannelBinding {
                        channel: 0x8000,
                        ..good
                    },
                    "channel above 0x7fff",
                ),
                (
                    ChannelBinding {
                        server: addr(Family::V6, SERVER4, SERVER6, TURN_PORT),
                        ..good
                    },
                    "client v4, server v6",
                ),
                (
                    ChannelBinding {
                        peer: addr(Family::V4, PEER4, PEER6, PEER_PORT),
                        ..good
                    },
                    "relay v6, peer v4",
                ),
            ] {
                assert!(
                    matches!(xdp.bind_channel(&bad), Err(XdpError::InvalidBinding(_))),
                    "{why} accepted"
                );
            }

            bind(xdp, &good);
            let f = from_client(&good, channel_data(good.channel, &data(10, 1), &[])).build();
            assert_eq!(run_on(xdp, &f, t.ext).action, action::REDIRECT);
            let last = xdp
                .unbind_channel(&good)
                .unwrap_or_else(|e| panic!("{}", report(e)));
            assert_eq!(last.to_peer_packets, 1);
            assert_eq!(last.to_peer_bytes, 10);
            // Gone from the kernel, and unbinding again is fine.
            assert_passed(xdp, "unbound", &f, t.ext, Stat::PassUnboundChannel);
            assert_eq!(
                xdp.unbind_channel(&good)
                    .unwrap_or_else(|e| panic!("{}", report(e))),
                ChannelCounters::default()
            );
            // The slot is zeroed for the next channel that gets it.
            assert_eq!(counters(xdp, good.counter_id), ChannelCounters::default());

            // Every stat is listed, in index order.
            let all = stats(xdp);
            assert_eq!(all.iter().map(|(s, _)| *s).collect::<Vec<_>>(), Stat::ALL);
        },
    );
}

/// The benchmark's yardsticks do what docs/benchmarks.md says they do, and nothing more: a
/// UDP frame of either family leaves redirected with its MACs swapped and nothing else
/// changed; anything else is passed untouched. (The second one also calls a helper, which
/// changes nothing a frame shows.)
#[test]
fn the_reference_program_swaps_macs_and_redirects_udp() {
    on_both_paths(
        "the_reference_program_swaps_macs_and_redirects_udp",
        |xdp, t| {
            xdp.load_reference()
                .unwrap_or_else(|e| panic!("{}", report(e)));
            for yardstick in [Yardstick::Reference, Yardstick::ReferenceWithCall] {
                for family in [Family::V4, Family::V6] {
                    let b = binding(family, family, 1);
                    let frame = from_client(&b, channel_data(b.channel, &data(60, 1), &[])).build();
                    let out = xdp
                        .reference_test_run(yardstick, &frame, t.ext, 1)
                        .unwrap_or_else(|e| panic!("{}", report(e)));
                    let mut expected = frame.clone();
                    expected[..6].copy_from_slice(&frame[6..12]);
                    expected[6..12].copy_from_slice(&frame[..6]);
                    assert_frame(
                        &format!("{yardstick:?}, {family:?} UDP"),
                        &out,
                        action::REDIRECT,
                        &expected,
                    );
                }
                let b = binding(Family::V4, Family::V4, 1);
                let mut arp = from_client(&b, data(60, 0)).build();
                arp[12..14].copy_from_slice(&[0x08, 0x06]);
                let mut tcp = from_client(&b, data(60, 0)).build();
                tcp[14 + 9] = 6;
                for (what, frame) in [("ARP", arp), ("TCP", tcp)] {
                    let out = xdp
                        .reference_test_run(yardstick, &frame, t.ext, 1)
                        .unwrap_or_else(|e| panic!("{}", report(e)));
                    assert_frame(
                        &format!("{yardstick:?}, {what}"),
                        &out,
                        action::PASS,
                        &frame,
                    );
                }
            }
        },
    );
}

// ---------------------------------------------------------------------------------------------
// Micro-benchmark
// ---------------------------------------------------------------------------------------------

const BENCH_REPEAT: u32 = 1_000_000;
/// Rewrites per repeated run: the TTL (255 at most) goes down by one per rewrite.
const BENCH_PING_PONG: u32 = 250;
/// Calls per measurement: single runs are cheap syscalls; a repeated run also swaps the
/// kernel's XDP dispatcher in and out (milliseconds), so fewer of those.
const BENCH_SAMPLES: usize = 20_000;
const BENCH_PING_PONG_CALLS: usize = 200;
const BENCH_PAYLOADS: [usize; 3] = [100, 500, 1200];

/// ns/packet of the program in the kernel, by direction, family and payload size, beside the
/// reference program measured on the same frames in the same run (`cargo xtask bench-xdp`;
/// results in docs/benchmarks.md, and as JSON where `RAMPART_BENCH_XDP_JSON` says).
///
/// `BPF_PROG_TEST_RUN` with `repeat` runs the program again on its own output, so a rewrite
/// cannot simply be repeated. Two ways around it:
/// - ping-pong: two bindings make each direction's output the other's input (client -> peer
///   -> client -> ...), so a repeated run alternates the two rewrites of a family pair and the
///   kernel's average is the mean of one client -> peer and one peer -> client rewrite. Every
///   rewrite takes one from the TTL, as it must (it bounds relay loops), so a run is 250
///   rewrites of a frame starting at TTL 255; the median over many such runs is reported.
///   The reference runs 250 times on each of the two input frames the same way (its output
///   is a valid input again), and its cost for the pair is the mean of the two.
/// - single runs of each direction on the original frame, median of many; these include the
///   test-run timer's own overhead, shown by the same measurement of a frame passed at the
///   first check (ARP), and so does the reference's single run beside them.
///
/// Frames the program leaves unchanged (not forwarded) are measured with plain `repeat`.
#[test]
#[ignore = "a benchmark: cargo xtask bench-xdp"]
fn bench_xdp() {
    with_topology("bench_xdp", Path::Fallback, |xdp, t| {
        xdp.load_reference()
            .unwrap_or_else(|e| panic!("{}", report(e)));
        let machine = Machine::read();
        println!(
            "\nBPF_PROG_TEST_RUN, {} CPUs ({}), kernel {}",
            machine.cpus, machine.cpu_model, machine.kernel
        );
        println!(
            "\n| client / peer | next hop | payload | Rampart, ping-pong mean of c->p and p->c | \
             reference, same frames | Rampart / reference | one helper call (reference with a \
             call - reference) | c->p, single run | p->c, single run | reference, single run \
             (c->p frame / p->c frame) |"
        );
        println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|");
        let mut results = Vec::new();
        // A quick comparison of two builds measures a few rows only, e.g. "ipv4/ipv4 cached 100".
        let only = std::env::var("RAMPART_BENCH_XDP_ROWS").ok();
        // What policing a bandwidth limit costs: every binding limited (so high that nothing is
        // dropped), against the same rows unlimited in another run.
        let limited = std::env::var_os("RAMPART_BENCH_XDP_LIMITED").is_some();
        let limit = if limited {
            println!("\nRAMPART_BENCH_XDP_LIMITED is set: every binding polices a limit");
            Limit::new(400_000_000_000, 1 << 40)
        } else {
            Limit::NONE
        };
        let hop = |ifindex, src_mac, dst_mac| NextHop {
            ifindex,
            mtu: 1500,
            src_mac,
            dst_mac,
            _pad: [0; 2],
        };
        for ((n, (client, peer)), path) in FAMILIES
            .into_iter()
            .enumerate()
            .flat_map(|pair| [(pair, Path::Cached), (pair, Path::Fallback)])
        {
            let c = addr(client, CLIENT4, CLIENT6, CLIENT_PORT);
            let s = addr(client, BENCH_SERVER4, BENCH_SERVER6, TURN_PORT);
            let r = addr(peer, BENCH_RELAY4, BENCH_RELAY6, 50000 + n as u16);
            let p = addr(peer, PEER4, PEER6, PEER_PORT);
            let channel = 0x4000 + n as u16;
            let expires_ns = monotonic_now_ns() + 3_600_000_000_000;
            // The channel, and its mirror image: UDP relay -> peer is then also a peer's
            // datagram to a relay address, whose ChannelData output is a client's input. (The
            // server and relay addresses are neighbours here, not local addresses, so that
            // the FIB lookups for the mirror succeed.)
            // On the cached path the bindings carry the next hops the FIB lookup finds (the
            // mirror's sources are not local addresses, so the agent's resolver would not be
            // asked for them).
            let cached = path == Path::Cached;
            let or_none = |next_hop| if cached { next_hop } else { NextHop::NONE };
            let forward = ChannelBinding {
                client: c,
                server: s,
                relay: r,
                peer: p,
                channel,
                counter_id: 100 + n as u32,
                expires_ns,
                to_peer: or_none(hop(t.int, INT_MAC, PEER_MAC)),
                to_client: or_none(hop(t.ext, EXT_MAC, CLIENT_MAC)),
                limit,
                budget_id: 1,
                budget_generation: 1,
            };
            let mirror = ChannelBinding {
                client: s,
                server: c,
                relay: p,
                peer: r,
                channel,
                counter_id: 200 + n as u32,
                expires_ns,
                to_peer: or_none(hop(t.int, INT_MAC, BENCH_RELAY_MAC)),
                to_client: or_none(hop(t.ext, EXT_MAC, BENCH_SERVER_MAC)),
                limit,
                budget_id: 2,
                budget_generation: 1,
            };
            for binding in [&forward, &mirror] {
                xdp.bind_channel(binding)
                    .unwrap_or_else(|e| panic!("{}", report(e)));
            }
            let next_hop = if cached { "cached" } else { "fib_lookup" };
            for size in BENCH_PAYLOADS {
                let label = format!(
                    "{}/{} {next_hop} {size}",
                    family_name(client),
                    family_name(peer)
                );
                if only
                    .as_ref()
                    .is_some_and(|only| !label.contains(only.as_str()))
                {
                    continue;
                }
                let payload = data(size, 1);
                let mut to_peer =
                    Udp::new(c, s, channel_data(channel, &payload, &[])).macs(CLIENT_MAC, EXT_MAC);
                let to_client = Udp::new(p, r, payload.clone())
                    .macs(PEER_MAC, INT_MAC)
                    .build();
                to_peer.ttl = 255;
                let to_peer = to_peer.build();
                let ping_pong =
                    median_run(xdp, Bench::Rampart, &to_peer, t.ext, BENCH_PING_PONG, None);
                // A yardstick's ping-pong: 250 runs on each of the two input frames.
                let yardstick_pair = |yardstick| {
                    let bench = Bench::Yardstick(yardstick);
                    (median_run(xdp, bench, &to_peer, t.ext, BENCH_PING_PONG, REDIRECT)
                        + median_run(xdp, bench, &to_client, t.int, BENCH_PING_PONG, REDIRECT))
                        / 2.0
                };
                let reference = yardstick_pair(Yardstick::Reference);
                let helper_call = yardstick_pair(Yardstick::ReferenceWithCall) - reference;
                let before = counters(xdp, forward.counter_id);
                let c2p = median_run(xdp, Bench::Rampart, &to_peer, t.ext, 1, REDIRECT);
                let p2c = median_run(xdp, Bench::Rampart, &to_client, t.int, 1, REDIRECT);
                let after = counters(xdp, forward.counter_id);
                assert_eq!(
                    after.to_peer_packets - before.to_peer_packets,
                    BENCH_SAMPLES as u64,
                    "every single run was forwarded"
                );
                let reference_single = |frame: &[u8], ingress| {
                    let bench = Bench::Yardstick(Yardstick::Reference);
                    median_run(xdp, bench, frame, ingress, 1, REDIRECT)
                };
                let reference_c2p = reference_single(&to_peer, t.ext);
                let reference_p2c = reference_single(&to_client, t.int);
                println!(
                    "| {client:?} / {peer:?} | {next_hop} | {size} | {ping_pong:.0} | \
                     {reference:.0} | {:.2} | {helper_call:.0} | {c2p:.0} | {p2c:.0} | \
                     {reference_c2p:.0} / {reference_p2c:.0} |",
                    ping_pong / reference
                );
                results.push(serde_json::json!({
                    "client": family_name(client),
                    "peer": family_name(peer),
                    "next_hop": next_hop,
                    "payload": size,
                    "rampart_ping_pong_ns": ping_pong,
                    "reference_ping_pong_ns": reference,
                    "ratio": ping_pong / reference,
                    "helper_call_ns": helper_call,
                    "rampart_c2p_single_ns": c2p,
                    "rampart_p2c_single_ns": p2c,
                    "reference_c2p_single_ns": reference_c2p,
                    "reference_p2c_single_ns": reference_p2c,
                }));
            }
            // The ping-pong really alternated: both bindings forwarded in both directions.
            let f = counters(xdp, forward.counter_id);
            let m = counters(xdp, mirror.counter_id);
            assert!(
                f.to_peer_packets > 0 && m.to_client_packets > 0,
                "{f:?} {m:?}"
            );
        }

        if only.is_some() {
            println!("\nRAMPART_BENCH_XDP_ROWS is set: not-forwarded frames and JSON skipped");
            return;
        }
        // What frames that are not forwarded cost (unchanged by the program, so `repeat`
        // measures them directly).
        let b = binding(Family::V4, Family::V4, 9);
        bind(xdp, &b);
        let arp = {
            let mut f = from_client(&b, data(100, 0)).build();
            f[12..14].copy_from_slice(&[0x08, 0x06]);
            f
        };
        let unknown = from_peer(
            &ChannelBinding {
                peer: SocketAddr::new(PEER4.into(), 1),
                ..b
            },
            data(100, 0x80),
        )
        .build();
        let stun = {
            let mut p = vec![0x00, 0x01, 0x00, 0x50, 0x21, 0x12, 0xa4, 0x42];
            p.extend_from_slice(&data(92, 0));
            from_client(&b, p).build()
        };
        // A bound channel whose peer has no neighbour entry: everything up to the FIB lookup,
        // which fails.
        let mut unresolved = binding(Family::V4, Family::V4, 10);
        unresolved.peer = SocketAddr::new(UNRESOLVED4.into(), PEER_PORT);
        bind(xdp, &unresolved);
        let fib_miss = from_client(
            &unresolved,
            channel_data(unresolved.channel, &data(100, 1), &[]),
        )
        .build();
        // A bound channel whose egress is not registered: everything but the rewrite itself.
        let unregistered = binding(Family::V4, Family::V4, 11);
        bind(xdp, &unregistered);
        let no_egress = from_client(
            &unregistered,
            channel_data(unregistered.channel, &data(100, 1), &[]),
        )
        .build();
        xdp.remove_egress_ifindex(t.int)
            .unwrap_or_else(|e| panic!("{}", report(e)));
        println!(
            "\n| not forwarded (XDP_PASS), IPv4, 100-byte payload | repeat {BENCH_REPEAT}, mean | \
             single run, median |"
        );
        println!("|---|---:|---:|");
        let mut passed = Vec::new();
        for (what, frame, ingress) in [
            ("ARP (first check)", &arp, t.ext),
            ("UDP, unknown 5-tuple (one map lookup)", &unknown, t.int),
            ("STUN to the server (one map lookup)", &stun, t.ext),
            (
                "bound channel, no neighbour (fails in the FIB lookup)",
                &fib_miss,
                t.ext,
            ),
            (
                "bound channel, egress not registered (all but the rewrite)",
                &no_egress,
                t.ext,
            ),
        ] {
            let repeated = xdp
                .test_run(frame, ingress, BENCH_REPEAT)
                .unwrap_or_else(|e| panic!("{}", report(e)));
            assert_eq!(repeated.action, action::PASS);
            let single = median_run(xdp, Bench::Rampart, frame, ingress, 1, Some(action::PASS));
            let mean = repeated.duration.as_nanos() as f64;
            println!("| {what} | {mean:.1} | {single:.0} |");
            passed.push(serde_json::json!({
                "frame": what,
                "repeat_mean_ns": mean,
                "single_run_median_ns": single,
            }));
        }
        if let Some(path) = std::env::var_os("RAMPART_BENCH_XDP_JSON") {
            let json = bench_json(&machine, &results, &passed);
            std::fs::write(&path, serde_json::to_string_pretty(&json).unwrap() + "\n")
                .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
            println!("\nwritten: {}", path.display());
        }
    });
}

const REDIRECT: Option<u32> = Some(action::REDIRECT);

/// Which program a benchmark measurement runs.
#[derive(Clone, Copy)]
enum Bench {
    Rampart,
    Yardstick(Yardstick),
}

fn family_name(family: Family) -> &'static str {
    match family {
        Family::V4 => "ipv4",
        Family::V6 => "ipv6",
    }
}

/// What the numbers were measured on.
struct Machine {
    cpus: usize,
    cpu_model: String,
    kernel: String,
}

impl Machine {
    fn read() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        Machine {
            cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
            cpu_model: cpuinfo
                .lines()
                .find_map(|l| l.strip_prefix("model name"))
                .and_then(|rest| rest.split_once(':'))
                .map_or_else(
                    || "unknown".to_owned(),
                    |(_, model)| model.trim().to_owned(),
                ),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .to_owned(),
        }
    }
}

/// docs/benchmarks/xdp.json: the headline numbers (ping-pong means at the smallest payload,
/// where the per-packet work is all there is) and every row behind them.
fn bench_json(
    machine: &Machine,
    results: &[serde_json::Value],
    passed: &[serde_json::Value],
) -> serde_json::Value {
    let row = |client: &str, peer: &str, next_hop: &str, key: &str| {
        results
            .iter()
            .find(|r| {
                r["client"] == client
                    && r["peer"] == peer
                    && r["next_hop"] == next_hop
                    && r["payload"] == BENCH_PAYLOADS[0]
            })
            .map(|r| r[key].clone())
            .unwrap_or(serde_json::Value::Null)
    };
    let headline = |client: &str, peer: &str, key: &str| row(client, peer, "cached", key);
    let fallback = |client: &str, peer: &str, key: &str| row(client, peer, "fib_lookup", key);
    serde_json::json!({
        "machine": {
            "cpus": machine.cpus,
            "cpu_model": machine.cpu_model,
            "kernel": machine.kernel,
        },
        "method": "BPF_PROG_TEST_RUN in a network namespace; ping-pong means (250 alternating \
                   rewrites per call, median of 200 calls) of Rampart's program and of the \
                   reference program (parse Ethernet/IP/UDP, swap MACs, redirect through the \
                   same devmap) on the same frames, in the same run",
        "payload": BENCH_PAYLOADS[0],
        "next_hop": "rampart_ns and ratio_to_reference: cached in the bindings (the agent's \
                     next-hop cache); the *_fib_lookup keys: no next hop cached, bpf_fib_lookup",
        "reference_ns": {
            "ipv4": headline("ipv4", "ipv4", "reference_ping_pong_ns"),
            "ipv6": headline("ipv6", "ipv6", "reference_ping_pong_ns"),
        },
        "helper_call_ns": {
            "what": "the reference with one helper call more (bpf_ktime_get_coarse_ns) minus \
                     the reference, same frames, same run: what one call into the kernel and \
                     back costs on this machine",
            "ipv4": headline("ipv4", "ipv4", "helper_call_ns"),
            "ipv6": headline("ipv6", "ipv6", "helper_call_ns"),
        },
        "rampart_ns": {
            "ipv4_ipv4": headline("ipv4", "ipv4", "rampart_ping_pong_ns"),
            "ipv6_ipv6": headline("ipv6", "ipv6", "rampart_ping_pong_ns"),
            "ipv4_ipv6": headline("ipv4", "ipv6", "rampart_ping_pong_ns"),
            "ipv6_ipv4": headline("ipv6", "ipv4", "rampart_ping_pong_ns"),
        },
        "rampart_ns_fib_lookup": {
            "ipv4_ipv4": fallback("ipv4", "ipv4", "rampart_ping_pong_ns"),
            "ipv6_ipv6": fallback("ipv6", "ipv6", "rampart_ping_pong_ns"),
            "ipv4_ipv6": fallback("ipv4", "ipv6", "rampart_ping_pong_ns"),
            "ipv6_ipv4": fallback("ipv6", "ipv4", "rampart_ping_pong_ns"),
        },
        "ratio_to_reference_fib_lookup": {
            "ipv4_ipv4": fallback("ipv4", "ipv4", "ratio"),
            "ipv6_ipv6": fallback("ipv6", "ipv6", "ratio"),
            "ipv4_ipv6": fallback("ipv4", "ipv6", "ratio"),
            "ipv6_ipv4": fallback("ipv6", "ipv4", "ratio"),
        },
        "ratio_to_reference": {
            "ipv4_ipv4": headline("ipv4", "ipv4", "ratio"),
            "ipv6_ipv6": headline("ipv6", "ipv6", "ratio"),
            "ipv4_ipv6": headline("ipv4", "ipv6", "ratio"),
            "ipv6_ipv4": headline("ipv6", "ipv4", "ratio"),
        },
        "rows": results,
        "not_forwarded": passed,
    })
}

/// The median over many calls of the kernel's time per run of `frame` (each call starts from
/// the original frame; `repeat` runs per call), in ns. Rampart's runs must forward (or, for
/// frames it does not own, pass) as `expected` says, where it says.
fn median_run(
    xdp: &XdpProgram,
    bench: Bench,
    frame: &[u8],
    ingress: u32,
    repeat: u32,
    expected: Option<u32>,
) -> f64 {
    let calls = if repeat == 1 {
        BENCH_SAMPLES
    } else {
        BENCH_PING_PONG_CALLS
    };
    let mut samples: Vec<Duration> = (0..calls)
        .map(|_| {
            let out = match bench {
                Bench::Rampart => xdp.test_run(frame, ingress, repeat),
                Bench::Yardstick(yardstick) => {
                    xdp.reference_test_run(yardstick, frame, ingress, repeat)
                }
            }
            .unwrap_or_else(|e| panic!("{}", report(e)));
            if let Some(expected) = expected {
                assert_eq!(out.action, expected);
            }
            out.duration
        })
        .collect();
    samples.sort();
    samples[samples.len() / 2].as_nanos() as f64
}
