//! Types shared by Rampart's XDP program (`relay-ebpf`) and the agent (`relay-user`).
//!
//! Every map key and value is defined here once, `#[repr(C)]` with explicit padding, so the
//! kernel side and the userspace side agree on the layout byte for byte. The `user` feature
//! implements [`aya::Pod`] for the key and value types so the agent can read and write them.
//! [`checksum`] holds the Internet-checksum arithmetic the program uses to rewrite packets, as
//! pure functions tested on the host; [`steering`] the owner function of the relay loops;
//! [`gathering`] the keys of the program that gathers a loop's peer datagrams on one socket.
#![no_std]

mod binary;
pub mod checksum;
pub mod gathering;
pub mod steering;

use core::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// An address's bytes in network order, an IPv4 one in the first 4 (the rest zero), and how
/// many there are (4 or 16): the form the BPF programs' keys hold addresses in.
pub fn address_bytes(ip: IpAddr) -> ([u8; 16], usize) {
    let mut address = [0u8; 16];
    match ip {
        IpAddr::V4(ip) => {
            address[..4].copy_from_slice(&ip.octets());
            (address, 4)
        }
        IpAddr::V6(ip) => (ip.octets(), 16),
    }
}

/// Subdirectory of the agent's bpffs pin path for this layout of the maps: bumped whenever a
/// map's key or value changes, so an upgraded agent never adopts maps it would misread.
pub const PIN_LAYOUT_VERSION: &str = "v3";

/// Name of the XDP program in the object file (the function carrying `#[xdp]`).
pub const PROGRAM_NAME: &str = "rampart_xdp";
/// Name of the benchmark's reference program in the same object: parse, swap MACs, redirect
/// through [`EGRESS_MAP`], nothing else. The agent never loads it.
pub const REFERENCE_PROGRAM_NAME: &str = "rampart_reference";
/// Name of the reference plus one helper call, in the same object: what a call into the
/// kernel costs on the machine, measured beside the other two. The agent never loads it.
pub const REFERENCE_CALL_PROGRAM_NAME: &str = "rampart_reference_call";

/// Name of the per-CPU array of [`Counter`]s, indexed by [`Stat`].
pub const STATS_MAP: &str = "RAMPART_STATS";
/// Name of the hash map [`ClientChannelKey`] -> [`ClientChannelValue`] (client -> peer).
pub const CLIENT_CHANNELS_MAP: &str = "RAMPART_CLIENT_CHANNELS";
/// Name of the hash map [`PeerChannelKey`] -> [`PeerChannelValue`] (peer -> client).
pub const PEER_CHANNELS_MAP: &str = "RAMPART_PEER_CHANNELS";
/// Name of the per-CPU array of [`ChannelCounters`], indexed by a binding's `counter_id` (a
/// slot the agent assigns, below the map's size). An array, not a hash: the verifier inlines
/// its lookup, where a hash lookup is a helper call and a hash computation per packet.
pub const CHANNEL_COUNTERS_MAP: &str = "RAMPART_CHANNEL_COUNTERS";
/// Name of the per-CPU array of [`TotalShare`]s, one per direction ([`TOTAL_TO_PEER`],
/// [`TOTAL_TO_CLIENT`]): each CPU's share of the agent's total bandwidth limit.
pub const TOTAL_MAP: &str = "RAMPART_TOTAL";
/// Index of the client -> peer direction in [`TOTAL_MAP`] (and of a [`Budget`] pair).
pub const TOTAL_TO_PEER: u32 = 0;
/// Index of the peer -> client direction.
pub const TOTAL_TO_CLIENT: u32 = 1;
/// Name of the program's read-only global (a `u8`, set when the agent loads it) saying
/// whether a total limit is configured: when it is 0 the verifier prunes the total's code, so
/// an agent without one pays nothing for it.
pub const TOTAL_ENABLED_GLOBAL: &str = "RAMPART_TOTAL_ENABLED";

/// How many [`Budget`]s the program holds: limited allocations with channels in the kernel
/// at once (beyond, their channels stay in userspace).
pub const BUDGET_SLOTS: u32 = 65536;
/// Name of the `DEVMAP_HASH` of the interfaces the program may redirect to (key = value =
/// ifindex). A hash, not an array, because an ifindex is not bounded by the map's size.
pub const EGRESS_MAP: &str = "RAMPART_EGRESS";

/// Default `max_entries` of [`CLIENT_CHANNELS_MAP`], [`PEER_CHANNELS_MAP`] and
/// [`CHANNEL_COUNTERS_MAP`]; the agent may override it at load time.
pub const DEFAULT_MAX_CHANNELS: u32 = 65536;
/// Default `max_entries` of [`EGRESS_MAP`].
pub const DEFAULT_MAX_EGRESS: u32 = 64;

/// Name of the one-entry array holding the program's [`Settings`].
pub const SETTINGS_MAP: &str = "RAMPART_SETTINGS";

/// What the agent tells the program about the host, in [`SETTINGS_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Settings {
    /// Flags of the fallback `bpf_fib_lookup` (for a binding without a cached next hop):
    /// `BPF_FIB_LOOKUP_DIRECT` ([`FIB_LOOKUP_DIRECT`]) when the host has no policy-routing
    /// rules beyond the default ones, which skips the rules; 0 otherwise (a full lookup).
    pub fib_flags: u32,
}

/// `BPF_FIB_LOOKUP_DIRECT`: look up the main table (or the interface's VRF) directly.
pub const FIB_LOOKUP_DIRECT: u32 = 1;

/// Where a rewritten frame leaves, resolved by the agent from the kernel's routing and
/// neighbour tables and kept true as they change, so the program needs no FIB lookup per
/// packet. `ifindex` 0 means none is cached: the program falls back to `bpf_fib_lookup`.
/// Stored inside the binding's hash-map value, which the agent replaces whole, so the program
/// never sees half of one.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct NextHop {
    /// Egress interface (in [`EGRESS_MAP`] unless it is the ingress one); 0 = not cached.
    pub ifindex: u32,
    /// Largest IP packet the egress takes (the route's MTU, else the interface's): larger
    /// rewritten frames go to userspace, as `bpf_fib_lookup`'s MTU check would send them.
    pub mtu: u16,
    /// The egress interface's MAC.
    pub src_mac: [u8; 6],
    /// The next hop's MAC (the gateway's, or the destination's on a connected network).
    pub dst_mac: [u8; 6],
    pub _pad: [u8; 2],
}

impl NextHop {
    /// No cached next hop.
    pub const NONE: NextHop = NextHop {
        ifindex: 0,
        mtu: 0,
        src_mac: [0; 6],
        dst_mac: [0; 6],
        _pad: [0; 2],
    };

    pub const fn is_cached(&self) -> bool {
        self.ifindex != 0
    }
}

/// Slots of [`STATS_MAP`]. The discriminant is the array index.
///
/// The program counts every frame in exactly one slot: what it did with it. `Pass*` frames
/// were handed to the kernel stack unchanged (userspace serves them, or the stack drops
/// them); `Drop*` frames were dropped. [`Stat::Seen`] is their sum, made by the reader: the
/// program leaves its slot at zero (one counter update less per frame).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Stat {
    /// Every frame the program was run on, whatever it then did with it: the sum of the other
    /// slots (the map's slot stays 0).
    Seen = 0,
    /// ChannelData from a client, sent on to its peer as plain UDP.
    ForwardedToPeer = 1,
    /// UDP from a peer, sent on to its client as ChannelData.
    ForwardedToClient = 2,
    /// Not IPv4/IPv6 UDP, or UDP of a 5-tuple no binding names (and not STUN/ChannelData).
    PassNotOurs = 3,
    /// A STUN message (leading bits 00 and the magic cookie): always userspace's.
    PassStun = 4,
    /// ChannelData (leading bits 01) whose client 5-tuple and channel have no binding.
    PassUnboundChannel = 5,
    /// A binding matched but its `expires_ns` has passed.
    PassExpired = 6,
    /// An IPv4 fragment (MF or offset) or an IPv6 fragment header.
    PassFragment = 7,
    /// IPv4 options (IHL != 5) or IPv6 extension headers.
    PassIpOptions = 8,
    /// An 802.1Q / 802.1ad VLAN tag.
    PassVlan = 9,
    /// Truncated or inconsistent headers, a bad IPv4 header checksum, a zero UDP checksum on
    /// IPv6: the kernel stack drops these.
    PassMalformed = 10,
    /// ChannelData length larger than the datagram, or more than 3 bytes after it.
    PassChannelLength = 11,
    /// An IPv4 datagram with UDP checksum 0 whose other side is IPv6, where the checksum is
    /// mandatory: userspace computes it.
    PassChecksumZeroV6 = 12,
    /// TTL / hop limit of 1 or 0: it may not be relayed further.
    PassTtl = 13,
    /// The FIB lookup found no route or no neighbour entry (or another failure).
    PassFibMiss = 14,
    /// The FIB lookup refused: forwarding is disabled on the ingress interface
    /// (`net.ipv4.conf.<if>.forwarding`, `net.ipv6.conf.<if>.forwarding`).
    PassForwardingDisabled = 15,
    /// The rewritten datagram would exceed the egress interface's MTU.
    PassFragNeeded = 16,
    /// The egress interface differs from the ingress one and is not in [`EGRESS_MAP`].
    PassNoEgress = 17,
    /// A binding whose addresses mix families (relay vs peer, server vs client).
    PassBadBinding = 18,
    /// `bpf_xdp_adjust_head` refused (the driver left too little headroom) before anything was
    /// written.
    PassAdjustFailed = 19,
    /// A helper failed after the frame was rewritten (a map changed under the program); the
    /// frame is dropped rather than sent half-rewritten. Should stay at zero.
    DropAfterRewrite = 20,
    /// The UDP checksum field holds only the pseudo-header sum of a sender that left the
    /// checksum to offload (a local process over veth): userspace relays it.
    PassChecksumPartial = 21,
    /// Over its allocation's bandwidth limit in that direction (the binding's [`Limit`]):
    /// dropped, as userspace drops it, rather than moved onto the userspace path.
    DropOverLimit = 22,
    /// Over this CPU's share of the agent's total bandwidth limit ([`TOTAL_MAP`]): dropped.
    DropOverTotal = 23,
}

impl Stat {
    /// Every slot, in index order.
    pub const ALL: [Stat; 24] = [
        Stat::Seen,
        Stat::ForwardedToPeer,
        Stat::ForwardedToClient,
        Stat::PassNotOurs,
        Stat::PassStun,
        Stat::PassUnboundChannel,
        Stat::PassExpired,
        Stat::PassFragment,
        Stat::PassIpOptions,
        Stat::PassVlan,
        Stat::PassMalformed,
        Stat::PassChannelLength,
        Stat::PassChecksumZeroV6,
        Stat::PassTtl,
        Stat::PassFibMiss,
        Stat::PassForwardingDisabled,
        Stat::PassFragNeeded,
        Stat::PassNoEgress,
        Stat::PassBadBinding,
        Stat::PassAdjustFailed,
        Stat::DropAfterRewrite,
        Stat::PassChecksumPartial,
        Stat::DropOverLimit,
        Stat::DropOverTotal,
    ];

    /// Index of this slot in [`STATS_MAP`].
    pub const fn index(self) -> u32 {
        self as u32
    }

    /// A stable snake_case name, for metrics and logs.
    pub const fn name(self) -> &'static str {
        match self {
            Stat::Seen => "seen",
            Stat::ForwardedToPeer => "forwarded_to_peer",
            Stat::ForwardedToClient => "forwarded_to_client",
            Stat::PassNotOurs => "pass_not_ours",
            Stat::PassStun => "pass_stun",
            Stat::PassUnboundChannel => "pass_unbound_channel",
            Stat::PassExpired => "pass_expired",
            Stat::PassFragment => "pass_fragment",
            Stat::PassIpOptions => "pass_ip_options",
            Stat::PassVlan => "pass_vlan",
            Stat::PassMalformed => "pass_malformed",
            Stat::PassChannelLength => "pass_channel_length",
            Stat::PassChecksumZeroV6 => "pass_checksum_zero_v6",
            Stat::PassTtl => "pass_ttl",
            Stat::PassFibMiss => "pass_fib_miss",
            Stat::PassForwardingDisabled => "pass_forwarding_disabled",
            Stat::PassFragNeeded => "pass_frag_needed",
            Stat::PassNoEgress => "pass_no_egress",
            Stat::PassBadBinding => "pass_bad_binding",
            Stat::PassAdjustFailed => "pass_adjust_failed",
            Stat::DropAfterRewrite => "drop_after_rewrite",
            Stat::PassChecksumPartial => "pass_checksum_partial",
            Stat::DropOverLimit => "drop_over_limit",
            Stat::DropOverTotal => "drop_over_total",
        }
    }
}

/// Number of entries of [`STATS_MAP`].
pub const STATS_LEN: u32 = Stat::ALL.len() as u32;

/// One CPU's count of frames and bytes for one [`Stat`]. Userspace sums it over CPUs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    pub packets: u64,
    /// Bytes of the frames as received, from the start of the Ethernet header to the end.
    pub bytes: u64,
}

/// A transport address as the maps store it: IPv4 as IPv4-mapped IPv6 (`::ffff:a.b.c.d`),
/// the port in host byte order. Build it with [`Endpoint::new`] (or `From<SocketAddr>`) so
/// the padding is zero: the kernel compares hash keys byte for byte. Aligned to 4 so that the
/// XDP program reads the address in whole words.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Endpoint {
    pub ip: [u8; 16],
    pub port: u16,
    pub _pad: [u8; 2],
}

/// The first 12 bytes of an IPv4-mapped IPv6 address (RFC 4291 §2.5.5.2).
pub const IPV4_MAPPED_PREFIX: [u8; 12] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff];

impl Endpoint {
    pub const fn new(ip: [u8; 16], port: u16) -> Self {
        Self {
            ip,
            port,
            _pad: [0; 2],
        }
    }

    /// `ip` as the 16 bytes of `::ffff:a.b.c.d`.
    pub const fn mapped_v4(ip: [u8; 4]) -> [u8; 16] {
        [
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, ip[0], ip[1], ip[2], ip[3],
        ]
    }

    /// Whether the address is IPv4 (stored IPv4-mapped).
    pub const fn is_ipv4(&self) -> bool {
        // Three 32-bit loads and compares, no early exit: the XDP program asks this of every
        // forwarded frame. (Assembled from bytes, the BPF backend loads each byte alone.)
        // SAFETY: `ip` is at offset 0 of a `repr(C, align(4))` struct, so it is aligned for
        // `[u32; 4]`, of the same size; every bit pattern is a valid `u32`.
        let words = unsafe { *(self.ip.as_ptr() as *const [u32; 4]) };
        (words[0] | words[1] | (words[2] ^ u32::from_ne_bytes([0, 0, 0xff, 0xff]))) == 0
    }

    /// The last four bytes: the IPv4 address when [`Endpoint::is_ipv4`].
    pub const fn ipv4_octets(&self) -> [u8; 4] {
        [self.ip[12], self.ip[13], self.ip[14], self.ip[15]]
    }

    pub fn socket_addr(&self) -> SocketAddr {
        let ip = if self.is_ipv4() {
            IpAddr::V4(Ipv4Addr::from(self.ipv4_octets()))
        } else {
            IpAddr::V6(Ipv6Addr::from(self.ip))
        };
        SocketAddr::new(ip, self.port)
    }
}

impl From<SocketAddr> for Endpoint {
    fn from(addr: SocketAddr) -> Self {
        let ip = match addr.ip() {
            IpAddr::V4(v4) => Self::mapped_v4(v4.octets()),
            // An IPv4-mapped IPv6 socket address is the IPv4 host on the wire.
            IpAddr::V6(v6) => v6.octets(),
        };
        Self::new(ip, addr.port())
    }
}

/// Key of [`CLIENT_CHANNELS_MAP`]: ChannelData arriving from `client` at the TURN server's
/// `server` address on `channel`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ClientChannelKey {
    pub client: Endpoint,
    pub server: Endpoint,
    pub channel: u16,
    pub _pad: [u8; 2],
}

impl ClientChannelKey {
    pub const fn new(client: Endpoint, server: Endpoint, channel: u16) -> Self {
        Self {
            client,
            server,
            channel,
            _pad: [0; 2],
        }
    }
}

/// Value of [`CLIENT_CHANNELS_MAP`]: send the data from the allocation's `relay` address to
/// `peer`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ClientChannelValue {
    pub relay: Endpoint,
    pub peer: Endpoint,
    /// `CLOCK_MONOTONIC` nanoseconds; once `bpf_ktime_get_coarse_ns` (the same clock as of the
    /// last tick) reaches it, the entry is unused.
    pub expires_ns: u64,
    /// Index of this channel's [`ChannelCounters`] in [`CHANNEL_COUNTERS_MAP`].
    pub counter_id: u32,
    /// Towards `peer`.
    pub next_hop: NextHop,
    /// The allocation's [`Budget`] slot, below [`BUDGET_SLOTS`] (meaningless when `limit` is
    /// [`Limit::NONE`]).
    pub budget_id: u32,
    /// Which use of the slot: a budget found with another is taken over, emptied.
    pub budget_generation: u32,
    /// The allocation's limit from its client (towards `peer`).
    pub limit: Limit,
}

/// Key of [`PEER_CHANNELS_MAP`]: UDP arriving from `peer` at the allocation's `relay` address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PeerChannelKey {
    pub relay: Endpoint,
    pub peer: Endpoint,
}

/// Value of [`PEER_CHANNELS_MAP`]: send it as ChannelData on `channel` from the TURN server's
/// `server` address to `client`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PeerChannelValue {
    pub client: Endpoint,
    pub server: Endpoint,
    /// `CLOCK_MONOTONIC` nanoseconds; once `bpf_ktime_get_coarse_ns` (the same clock as of the
    /// last tick) reaches it, the entry is unused.
    pub expires_ns: u64,
    /// Index of this channel's [`ChannelCounters`] in [`CHANNEL_COUNTERS_MAP`].
    pub counter_id: u32,
    pub channel: u16,
    pub _pad: [u8; 2],
    /// Towards `client`.
    pub next_hop: NextHop,
    /// The allocation's [`Budget`] slot, below [`BUDGET_SLOTS`] (meaningless when `limit` is
    /// [`Limit::NONE`]).
    pub budget_id: u32,
    /// As in [`ClientChannelValue`].
    pub budget_generation: u32,
    pub _pad2: [u8; 4],
    /// The allocation's limit towards its client.
    pub limit: Limit,
}

/// One CPU's traffic of one channel, in application payload bytes (the ChannelData data, the
/// peer's UDP payload). Userspace sums it over CPUs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ChannelCounters {
    pub to_peer_packets: u64,
    pub to_peer_bytes: u64,
    pub to_client_packets: u64,
    pub to_client_bytes: u64,
    /// Dropped over the allocation's limit ([`Stat::DropOverLimit`]).
    pub to_peer_over_limit_packets: u64,
    pub to_peer_over_limit_bytes: u64,
    pub to_client_over_limit_packets: u64,
    pub to_client_over_limit_bytes: u64,
}

impl ChannelCounters {
    /// Field-wise wrapping sum (per-CPU values added up).
    pub const fn add(self, other: Self) -> Self {
        Self {
            to_peer_packets: self.to_peer_packets.wrapping_add(other.to_peer_packets),
            to_peer_bytes: self.to_peer_bytes.wrapping_add(other.to_peer_bytes),
            to_client_packets: self.to_client_packets.wrapping_add(other.to_client_packets),
            to_client_bytes: self.to_client_bytes.wrapping_add(other.to_client_bytes),
            to_peer_over_limit_packets: self
                .to_peer_over_limit_packets
                .wrapping_add(other.to_peer_over_limit_packets),
            to_peer_over_limit_bytes: self
                .to_peer_over_limit_bytes
                .wrapping_add(other.to_peer_over_limit_bytes),
            to_client_over_limit_packets: self
                .to_client_over_limit_packets
                .wrapping_add(other.to_client_over_limit_packets),
            to_client_over_limit_bytes: self
                .to_client_over_limit_bytes
                .wrapping_add(other.to_client_over_limit_bytes),
        }
    }
}

/// A bandwidth limit in the form the program applies it: a GCRA (the virtual-time form of a
/// token bucket, one `u64` of state per bucket: the theoretical arrival time of the next byte
/// at the limit's rate) in nanoseconds of `CLOCK_MONOTONIC`. The agent computes it from bits
/// per second and a burst in bytes ([`Limit::new`]); the program only multiplies, adds and
/// compares ([`Limit::admit`]). Carried inside the bindings, which the agent replaces whole, so
/// a change of limit never meets half-written state.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Limit {
    /// Nanoseconds one byte takes at the limit's rate, in 48.16 fixed point; 0 = no limit.
    pub ns_per_byte_q16: u64,
    /// How far ahead of now the bucket's arrival time may run: the burst, in nanoseconds.
    pub burst_ns: u64,
}

impl Limit {
    /// No limit.
    pub const NONE: Limit = Limit {
        ns_per_byte_q16: 0,
        burst_ns: 0,
    };

    /// The slowest rate a [`Limit`] takes: below it a 64 KiB datagram's cost could overflow.
    pub const MIN_BITS_PER_SECOND: u64 = 1000;

    /// The smallest burst the program is given, in nanoseconds at the rate. Its clock (the
    /// kernel's coarse one, read per packet for a few ns instead of a clocksource read) moves
    /// in steps of one tick (1 to 10 ms); a bucket whose burst is shorter than a step would
    /// admit only the burst per step, below the rate.
    pub const MIN_BURST_NS: u64 = 20_000_000;

    /// `bits_per_second` (raised to [`Limit::MIN_BITS_PER_SECOND`]) with a burst of
    /// `burst_bytes` (raised to [`Limit::MIN_BURST_NS`] at that rate).
    pub const fn new(bits_per_second: u64, burst_bytes: u64) -> Limit {
        let bits_per_second = if bits_per_second < Self::MIN_BITS_PER_SECOND {
            Self::MIN_BITS_PER_SECOND
        } else {
            bits_per_second
        };
        let ns_per_byte_q16 = ((8_000_000_000u128 << 16) / bits_per_second as u128) as u64;
        let burst_ns = burst_bytes as u128 * 8_000_000_000 / bits_per_second as u128;
        let burst_ns = if burst_ns > u64::MAX as u128 {
            u64::MAX
        } else {
            burst_ns as u64
        };
        Limit {
            // At least 1: a rate so high that a byte costs under 2^-16 ns is still a limit.
            ns_per_byte_q16: if ns_per_byte_q16 == 0 {
                1
            } else {
                ns_per_byte_q16
            },
            burst_ns: if burst_ns < Self::MIN_BURST_NS {
                Self::MIN_BURST_NS
            } else {
                burst_ns
            },
        }
    }

    pub const fn is_limited(&self) -> bool {
        self.ns_per_byte_q16 != 0
    }

    /// How long `bytes` (at most 65535) take at the limit's rate, in nanoseconds.
    #[inline(always)]
    pub const fn cost(&self, bytes: u64) -> u64 {
        (bytes * self.ns_per_byte_q16) >> 16
    }

    /// Whether `bytes` (at most 65535) pass at `now` in a bucket whose arrival time is `tat`;
    /// their cost in nanoseconds, to be added to `tat` (after raising it to `now`), when so.
    #[inline(always)]
    pub const fn admit(&self, tat: u64, now: u64, bytes: u64) -> Option<u64> {
        let start = if tat > now { tat } else { now };
        let cost = self.cost(bytes);
        if start - now + cost > self.burst_ns {
            None
        } else {
            Some(cost)
        }
    }
}

/// One direction's bucket of one limited allocation: the arrival time of [`Limit::admit`],
/// and the generation of the binding that last used it. Program-owned (in its global data:
/// the agent never writes it), so the agent gives a slot to a new allocation by giving its
/// bindings a new generation, and the program empties the bucket on seeing one.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Budget {
    pub generation: u32,
    pub _pad: u32,
    pub tat_ns: u64,
}

/// One CPU's share of the total limit in one direction. The agent writes `limit` every tenth
/// of a second (reading the value back first, so that `tat_ns` and `offered_bytes`, which the
/// program writes, lose at most what the program added in between); the program polices and
/// counts with plain stores, since the value is this CPU's own.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TotalShare {
    pub limit: Limit,
    pub tat_ns: u64,
    /// Application bytes offered on this CPU, passed or not (wrapping): its demand.
    pub offered_bytes: u64,
}

// The kernel copies keys and values as raw bytes: no implicit padding may sneak in.
const _: () = {
    use core::mem::{align_of, size_of};
    assert!(size_of::<Counter>() == 16);
    assert!(size_of::<Endpoint>() == 20 && align_of::<Endpoint>() == 4);
    assert!(size_of::<ClientChannelKey>() == 44 && align_of::<ClientChannelKey>() == 4);
    assert!(size_of::<NextHop>() == 20 && align_of::<NextHop>() == 4);
    assert!(size_of::<ClientChannelValue>() == 96 && align_of::<ClientChannelValue>() == 8);
    assert!(size_of::<PeerChannelKey>() == 40 && align_of::<PeerChannelKey>() == 4);
    assert!(size_of::<PeerChannelValue>() == 104 && align_of::<PeerChannelValue>() == 8);
    assert!(size_of::<Settings>() == 4);
    assert!(size_of::<ChannelCounters>() == 64);
    assert!(size_of::<Limit>() == 16);
    assert!(size_of::<Budget>() == 16);
    assert!(size_of::<TotalShare>() == 32);
};

// SAFETY (all of these): `#[repr(C)]`, made of integers and byte arrays only, no implicit
// padding (sizes asserted above), and every bit pattern is a valid value.
#[cfg(feature = "user")]
mod pod {
    use super::*;
    unsafe impl aya::Pod for Counter {}
    unsafe impl aya::Pod for Endpoint {}
    unsafe impl aya::Pod for ClientChannelKey {}
    unsafe impl aya::Pod for ClientChannelValue {}
    unsafe impl aya::Pod for PeerChannelKey {}
    unsafe impl aya::Pod for PeerChannelValue {}
    unsafe impl aya::Pod for ChannelCounters {}
    unsafe impl aya::Pod for NextHop {}
    unsafe impl aya::Pod for Settings {}
    unsafe impl aya::Pod for Limit {}
    unsafe impl aya::Pod for TotalShare {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_indices_are_dense() {
        for (i, stat) in Stat::ALL.iter().enumerate() {
            assert_eq!(stat.index() as usize, i);
        }
        assert_eq!(STATS_LEN as usize, Stat::ALL.len());
    }

    #[test]
    fn stat_names_are_distinct() {
        for (i, a) in Stat::ALL.iter().enumerate() {
            for b in &Stat::ALL[i + 1..] {
                assert_ne!(a.name(), b.name());
            }
        }
    }

    /// Offers `factor` times the limit for `seconds` in `size`-byte datagrams, with a clock
    /// that moves in 4 ms ticks as the program's coarse one does; the bytes admitted.
    fn admitted(limit: &Limit, bits_per_second: u64, factor: u64, size: u64, seconds: u64) -> u64 {
        let gap = size * 8 * 1_000_000_000 / (bits_per_second * factor);
        let tick = 4_000_000;
        let (mut tat, mut admitted) = (0u64, 0u64);
        let mut at = 1_000_000_000u64;
        let end = at + seconds * 1_000_000_000;
        while at < end {
            let now = at / tick * tick;
            if let Some(cost) = limit.admit(tat, now, size) {
                tat = tat.max(now) + cost;
                admitted += size;
            }
            at += gap;
        }
        admitted
    }

    #[test]
    fn a_limit_cuts_a_flow_ten_times_over_it_to_its_rate_and_burst() {
        // 2 Mbit/s, 25 kB burst, 20 Mbit/s offered for 5 s.
        let limit = Limit::new(2_000_000, 25_000);
        let got = admitted(&limit, 2_000_000, 10, 1000, 5);
        let expected = 250_000 * 5 + 25_000;
        assert!(
            got.abs_diff(expected) * 100 < expected,
            "{got} admitted, {expected} expected"
        );
    }

    #[test]
    fn a_flow_under_its_limit_passes_whole_even_with_a_small_burst() {
        // The burst (1500 B, 6 ms at 2 Mbit/s) is raised to two ticks' worth.
        let limit = Limit::new(2_000_000, 1500);
        assert_eq!(limit.burst_ns, Limit::MIN_BURST_NS);
        let got = admitted(&limit, 2_000_000, 1, 1000, 5);
        assert!(got >= 5 * 250_000 * 99 / 100, "{got} admitted of 1250000");
    }

    #[test]
    fn limits_stay_in_range_at_both_ends() {
        assert!(!Limit::NONE.is_limited());
        let slow = Limit::new(1, 1);
        assert_eq!(slow, Limit::new(Limit::MIN_BITS_PER_SECOND, 1));
        // The largest datagram at the slowest rate does not overflow: 65535 B at 1 kbit/s.
        assert_eq!(slow.admit(0, 0, 65535), None);
        assert!(slow.admit(0, 0, 2).is_some());
        let fast = Limit::new(400_000_000_000, 1_000_000);
        assert!(fast.is_limited());
        assert!(fast.admit(0, 0, 65535).is_some());
    }

    #[test]
    fn endpoints_store_ipv4_mapped() {
        let v4: SocketAddr = "192.0.2.7:3478".parse().unwrap();
        let e = Endpoint::from(v4);
        assert!(e.is_ipv4());
        assert_eq!(&e.ip[..12], &IPV4_MAPPED_PREFIX);
        assert_eq!(e.ipv4_octets(), [192, 0, 2, 7]);
        assert_eq!(e.port, 3478);
        assert_eq!(e.socket_addr(), v4);

        let v6: SocketAddr = "[2001:db8::1]:50000".parse().unwrap();
        let e = Endpoint::from(v6);
        assert!(!e.is_ipv4());
        assert_eq!(e.socket_addr(), v6);

        // An IPv4-mapped IPv6 socket address is the IPv4 host.
        let mapped: SocketAddr = "[::ffff:192.0.2.7]:3478".parse().unwrap();
        assert_eq!(Endpoint::from(mapped), Endpoint::from(v4));
    }
}
