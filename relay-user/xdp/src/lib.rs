//! Loader for Rampart's XDP program (the `relay-ebpf` crate) and typed access to its maps.
//!
//! `build.rs` builds the program for `bpfel-unknown-none` and the object is embedded in the
//! agent, so the agent binary is self-contained. [`XdpProgram::load`] (or
//! [`XdpProgram::load_with`], to size the maps) hands it to the kernel (which runs the
//! verifier), [`XdpProgram::attach`] hooks it on an interface. The agent then drives it:
//! [`XdpProgram::bind_channel`] / [`XdpProgram::unbind_channel`] for every TURN channel it wants
//! forwarded in the kernel, [`XdpProgram::add_egress_interface`] for every interface the
//! program may send a rewritten frame out of (other than the one it came in on), and reads
//! [`XdpProgram::stats`] and [`XdpProgram::channel_counters`]. [`XdpProgram::test_run`] runs the
//! program on a crafted frame in the kernel (`BPF_PROG_TEST_RUN`) without attaching it.
//! Dropping the [`XdpProgram`] detaches it from every interface and unloads it.
//!
//! Expiry is kernel time: every binding carries `expires_ns` on `CLOCK_MONOTONIC`
//! ([`monotonic_now_ns`]), the clock of `bpf_ktime_get_coarse_ns`, so the kernel stops forwarding a
//! channel on time even if the agent is gone.
//!
//! The fast path's egress is the [`NextHop`] each direction of a binding carries (egress
//! interface, both MACs, MTU), which the agent resolves from the kernel's routing and
//! neighbour tables and rewrites when they change ([`next_hop`], over [`netlink`]). A binding without one
//! (`NextHop::NONE`) is routed by the kernel's FIB (`bpf_fib_lookup`, as for a forwarded
//! packet; [`XdpProgram::set_fib_flags`]): forwarding must then be enabled on the interfaces
//! the program is attached to (`net.ipv4.conf.<if>.forwarding`,
//! `net.ipv6.conf.<if>.forwarding`), and the next hop must be in the neighbour table;
//! otherwise the datagram goes to userspace, counted in [`Stat::PassForwardingDisabled`] or
//! [`Stat::PassFibMiss`].
//!
//! [`steering`] keeps each client on the relay loop that owns it (a reuseport program);
//! [`gathering`] brings each loop's peer datagrams to one socket of its own (`sk_lookup`).
//! [`fast_path`] is what the agent runs on top: TURN channels from the core in, bindings and
//! next hops in the maps, kept true as routes and neighbours change.
//!
//! Needs root, or `CAP_BPF` + `CAP_NET_ADMIN` (+ `CAP_PERFMON` for some helpers).

pub mod fast_path;
pub mod gathering;
pub mod netlink;
pub mod next_hop;
pub mod steering;

use std::{
    net::SocketAddr,
    os::fd::{AsFd as _, AsRawFd as _},
    path::{Path, PathBuf},
    time::Duration,
};

pub use aya::programs::XdpMode;
use aya::{
    Ebpf, EbpfLoader, TestRun as _, TestRunOptions,
    maps::{
        Array, DevMapHash, HashMap, Map, MapData, MapError, PerCpuArray, PerCpuValues,
        xdp::XdpMapError,
    },
    programs::{
        ProgramError, Xdp,
        links::{FdLink, PinnedLink},
        xdp::{XdpLink, XdpLinkId},
    },
    util::nr_cpus,
};
pub use relay_common::{
    BUDGET_SLOTS, ChannelCounters, Counter, FIB_LOOKUP_DIRECT, Limit, NextHop, Stat, TotalShare,
};
use relay_common::{
    CHANNEL_COUNTERS_MAP, CLIENT_CHANNELS_MAP, ClientChannelKey, ClientChannelValue,
    DEFAULT_MAX_CHANNELS, DEFAULT_MAX_EGRESS, EGRESS_MAP, Endpoint, PEER_CHANNELS_MAP,
    PROGRAM_NAME, PeerChannelKey, PeerChannelValue, REFERENCE_CALL_PROGRAM_NAME,
    REFERENCE_PROGRAM_NAME, SETTINGS_MAP, STATS_MAP, Settings, TOTAL_ENABLED_GLOBAL, TOTAL_MAP,
    TOTAL_TO_CLIENT, TOTAL_TO_PEER,
};

/// Slots read per `BPF_MAP_LOOKUP_BATCH` call by [`XdpProgram::channel_counters_batch`].
pub const COUNTER_BATCH: u32 = 1024;
/// `bpf()` command number of `BPF_MAP_LOOKUP_BATCH` (linux/bpf.h, since 5.6).
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;

/// `union bpf_attr`'s `batch` member, the argument of the `BPF_MAP_*_BATCH` commands.
#[repr(C)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// The object built by `build.rs`. Empty when the build was made with `AYA_BUILD_SKIP=1`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/rampart-xdp"));

/// Why the XDP fast path could not be set up or read. Each variant says what to check.
#[derive(Debug, thiserror::Error)]
pub enum XdpError {
    #[error(
        "this agent was built with AYA_BUILD_SKIP=1, without the XDP program; \
         rebuild after `cargo xtask setup` to get the fast path"
    )]
    NotBuilt,
    #[error(
        "loading the XDP object into the kernel failed (it needs root, or CAP_BPF and CAP_NET_ADMIN)"
    )]
    Load(#[source] aya::EbpfError),
    #[error("the XDP object has no program named {0}; relay-ebpf and relay-common disagree")]
    ProgramMissing(&'static str),
    #[error("the XDP object has no map named {0}; relay-ebpf and relay-common disagree")]
    MapMissing(&'static str),
    #[error("{0} did not pass the kernel verifier or could not be loaded")]
    Verify(&'static str, #[source] ProgramError),
    #[error(
        "attaching XDP to interface {interface} in mode {mode:?} failed (does the interface exist \
         in this network namespace? does its driver support that mode? loopback, bridges and \
         most virtual devices only support Skb)"
    )]
    Attach {
        interface: String,
        mode: XdpMode,
        #[source]
        source: ProgramError,
    },
    #[error("XDP is not attached to interface {0}")]
    NotAttached(String),
    #[error("a reuseport group of {0} sockets cannot be steered (1 to 256)")]
    Loops(usize),
    #[error("attaching the reuseport program to the group failed (SO_ATTACH_REUSEPORT_EBPF)")]
    Steering(#[source] ProgramError),
    #[error("attaching the sk_lookup program to this network namespace failed")]
    Gathering(#[source] ProgramError),
    #[error(
        "this process's network namespace (/proc/self/ns/net) or a map's descriptor cannot be opened"
    )]
    Namespace(#[source] std::io::Error),
    #[error("detaching XDP from interface {interface} failed")]
    Detach {
        interface: String,
        #[source]
        source: ProgramError,
    },
    #[error("the batched lookup in map {map} failed")]
    Batch {
        map: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("reading or updating map {map} failed")]
    Map {
        map: &'static str,
        #[source]
        source: MapError,
    },
    #[error("channel binding refused: {0}")]
    InvalidBinding(&'static str),
    #[error("no interface named {0} in this network namespace")]
    NoSuchInterface(String),
    #[error("adding interface index {ifindex} to {EGRESS_MAP} failed")]
    Egress {
        ifindex: u32,
        #[source]
        source: XdpMapError,
    },
    #[error("preparing per-CPU map values failed ({0})")]
    Cpus(&'static str, #[source] std::io::Error),
    #[error("preparing the bpffs pin directory {path} failed")]
    PinDirectory {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the pinned link {path} cannot be adopted (remove it to attach afresh, which interrupts \
         kernel forwarding on that interface for a moment)"
    )]
    AdoptLink {
        path: PathBuf,
        #[source]
        source: aya::programs::links::LinkError,
    },
    #[error("pinning the XDP link of {interface} at {path} failed")]
    PinLink {
        interface: String,
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("running {PROGRAM_NAME} on a test frame (BPF_PROG_TEST_RUN) failed")]
    TestRun(#[source] ProgramError),
}

/// `max_entries` of the program's maps, set at load time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapSizes {
    /// Channels the kernel can forward at once (each takes one entry in the client map, one in
    /// the peer map and one set of counters); counter ids are below it.
    pub channels: u32,
    /// Interfaces the program may redirect to.
    pub egress_interfaces: u32,
}

impl Default for MapSizes {
    fn default() -> Self {
        Self {
            channels: DEFAULT_MAX_CHANNELS,
            egress_interfaces: DEFAULT_MAX_EGRESS,
        }
    }
}

/// Which way relayed data goes, as the total limit's shares are kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TotalDirection {
    ToPeer = TOTAL_TO_PEER as isize,
    ToClient = TOTAL_TO_CLIENT as isize,
}

/// One TURN channel to forward in the kernel, both ways (RFC 8656 §12): ChannelData from
/// `client` to `server` on `channel` goes to `peer` from `relay`, and UDP from `peer` to
/// `relay` goes to `client` from `server` as ChannelData on `channel`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChannelBinding {
    /// The client's transport address as the server sees it (its 5-tuple's source).
    pub client: SocketAddr,
    /// The TURN server's address the client sends to (e.g. `:3478`).
    pub server: SocketAddr,
    /// The allocation's relayed transport address.
    pub relay: SocketAddr,
    /// The peer the channel is bound to.
    pub peer: SocketAddr,
    /// 0x4000-0x7FFF.
    pub channel: u16,
    /// Index of the channel's counters, chosen by the agent: one per binding, below
    /// [`MapSizes::channels`].
    pub counter_id: u32,
    /// `CLOCK_MONOTONIC` nanoseconds ([`monotonic_now_ns`]) at which the kernel stops using
    /// the binding: the channel binding's lifetime (RFC 8656 §12: 10 minutes) capped by the
    /// permission's and the allocation's.
    pub expires_ns: u64,
    /// Where ChannelData turned into UDP goes (towards `peer`); `NextHop::NONE`: FIB lookup.
    pub to_peer: NextHop,
    /// Where UDP turned into ChannelData goes (towards `client`); `NextHop::NONE`: FIB lookup.
    pub to_client: NextHop,
    /// The allocation's bandwidth limit, each direction ([`Limit::NONE`]: none).
    pub limit: Limit,
    /// The allocation's budget slot in the program, chosen by the agent: one per limited
    /// allocation, shared by its channels, below [`BUDGET_SLOTS`].
    pub budget_id: u32,
    /// Which use of the slot: the program empties a bucket it finds with another generation,
    /// so a slot given to a new allocation starts empty without the agent writing it.
    pub budget_generation: u32,
}

impl ChannelBinding {
    fn endpoints(&self) -> Result<[Endpoint; 4], XdpError> {
        if !(0x4000..=0x7fff).contains(&self.channel) {
            return Err(XdpError::InvalidBinding(
                "channel number outside 0x4000-0x7FFF",
            ));
        }
        let [client, server, relay, peer] =
            [self.client, self.server, self.relay, self.peer].map(Endpoint::from);
        if client.is_ipv4() != server.is_ipv4() {
            return Err(XdpError::InvalidBinding(
                "client and server addresses are of different families",
            ));
        }
        if relay.is_ipv4() != peer.is_ipv4() {
            return Err(XdpError::InvalidBinding(
                "relay and peer addresses are of different families",
            ));
        }
        Ok([client, server, relay, peer])
    }

    fn keys(&self) -> Result<(ClientChannelKey, PeerChannelKey), XdpError> {
        let [client, server, relay, peer] = self.endpoints()?;
        Ok((
            ClientChannelKey::new(client, server, self.channel),
            PeerChannelKey { relay, peer },
        ))
    }
}

/// The fixed programs `cargo xtask bench-xdp` measures beside Rampart's (relay-ebpf's
/// `reference` module).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Yardstick {
    /// Parses Ethernet/IP/UDP, swaps the MACs, redirects through the same devmap.
    Reference,
    /// The same with one helper call more: the difference is what a call into the kernel
    /// costs on this machine.
    ReferenceWithCall,
}

impl Yardstick {
    fn program_name(self) -> &'static str {
        match self {
            Yardstick::Reference => REFERENCE_PROGRAM_NAME,
            Yardstick::ReferenceWithCall => REFERENCE_CALL_PROGRAM_NAME,
        }
    }
}

/// What [`XdpProgram::test_run`] gives back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TestRunOutput {
    /// The XDP action (`XDP_PASS` = 2, `XDP_TX` = 3, `XDP_REDIRECT` = 4, ...).
    pub action: u32,
    /// The frame as the program left it.
    pub frame: Vec<u8>,
    /// The kernel's measured time per run (averaged over `repeat` runs).
    pub duration: Duration,
}

/// XDP actions, as [`TestRunOutput::action`] reports them.
pub mod action {
    pub const ABORTED: u32 = 0;
    pub const DROP: u32 = 1;
    pub const PASS: u32 = 2;
    pub const TX: u32 = 3;
    pub const REDIRECT: u32 = 4;
}

/// Now on `CLOCK_MONOTONIC`, the clock of the program's `bpf_ktime_get_coarse_ns` (which
/// lags it by up to a tick), in nanoseconds.
pub fn monotonic_now_ns() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid out-pointer; CLOCK_MONOTONIC always exists on Linux.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_MONOTONIC) cannot fail");
    (now.tv_sec as u64) * 1_000_000_000 + now.tv_nsec as u64
}

/// The XDP program, loaded in the kernel, and the interfaces it is attached to.
pub struct XdpProgram {
    ebpf: Ebpf,
    links: Vec<(String, XdpLinkId)>,
    /// Links kept in bpffs: they stay attached when the agent exits (even by SIGKILL), so
    /// bound channels keep forwarding until their recorded expiry.
    pinned_links: Vec<(String, PinnedLink)>,
}

/// How [`XdpProgram::attach_pinned`] hooked the program on an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attached {
    /// A new link, now pinned.
    New,
    /// The link a previous agent pinned: this program replaced the old one in it atomically,
    /// with no moment in which the interface had no program.
    Adopted,
}

/// `BPF_FS_MAGIC` from `<linux/magic.h>`.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
/// Where bpffs is conventionally mounted.
const BPF_FS: &str = "/sys/fs/bpf";

impl std::fmt::Debug for XdpProgram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let interfaces: Vec<&str> = self.links.iter().map(|(name, _)| name.as_str()).collect();
        f.debug_struct("XdpProgram")
            .field("program", &PROGRAM_NAME)
            .field("attached_to", &interfaces)
            .finish()
    }
}

impl XdpProgram {
    /// Loads the embedded object with the default [`MapSizes`]: creates its maps and runs the
    /// program through the verifier. Nothing is attached yet.
    pub fn load() -> Result<Self, XdpError> {
        Self::load_with(MapSizes::default(), false)
    }

    /// [`XdpProgram::load`] with maps of the given sizes, policing a total limit or not (see
    /// [`XdpProgram::load_pinned`]).
    pub fn load_with(sizes: MapSizes, police_total: bool) -> Result<Self, XdpError> {
        Self::load_from(sizes, None, police_total)
    }

    /// [`XdpProgram::load_with`], with the maps pinned in bpffs under `directory` (created,
    /// and bpffs mounted at /sys/fs/bpf if it is not): maps already pinned there by a previous
    /// agent are reused, with the channels and counters they hold.
    /// `police_total`: whether the program polices a total limit, by the per-CPU shares
    /// [`XdpProgram::set_total_shares`] gives it (without, that code is pruned at load).
    pub fn load_pinned(
        sizes: MapSizes,
        directory: &Path,
        police_total: bool,
    ) -> Result<Self, XdpError> {
        prepare_pin_directory(directory)?;
        Self::load_from(sizes, Some(directory), police_total)
    }

    fn load_from(
        sizes: MapSizes,
        pins: Option<&Path>,
        police_total: bool,
    ) -> Result<Self, XdpError> {
        if OBJECT.is_empty() {
            return Err(XdpError::NotBuilt);
        }
        let total_enabled = u8::from(police_total);
        let mut loader = EbpfLoader::new();
        loader
            .map_max_entries(CLIENT_CHANNELS_MAP, sizes.channels)
            .map_max_entries(PEER_CHANNELS_MAP, sizes.channels)
            .map_max_entries(CHANNEL_COUNTERS_MAP, sizes.channels)
            .map_max_entries(EGRESS_MAP, sizes.egress_interfaces)
            .override_global(TOTAL_ENABLED_GLOBAL, &total_enabled, true);
        if let Some(directory) = pins {
            for name in PINNED_MAPS {
                loader.map_pin_path(name, directory.join(name));
            }
        }
        let mut ebpf = loader.load(OBJECT).map_err(XdpError::Load)?;
        program(&mut ebpf)?
            .load()
            .map_err(|e| XdpError::Verify(PROGRAM_NAME, e))?;
        Ok(Self {
            ebpf,
            links: Vec::new(),
            pinned_links: Vec::new(),
        })
    }

    /// Attaches the program to `interface` through a link pinned at `<directory>/link_<interface>`.
    /// If a previous agent left one there, this program takes its place in it atomically (an
    /// upgrade or restart without a gap in forwarding); otherwise a new link is made in `mode`
    /// and pinned.
    pub fn attach_pinned(
        &mut self,
        interface: &str,
        mode: XdpMode,
        directory: &Path,
    ) -> Result<Attached, XdpError> {
        let path = directory.join(format!("link_{interface}"));
        if path.exists() {
            let adopt = |source| XdpError::AdoptLink {
                path: path.clone(),
                source,
            };
            let pinned = PinnedLink::from_pin(&path).map_err(adopt)?;
            let link = XdpLink::try_from(FdLink::from(pinned)).map_err(adopt)?;
            let id = program(&mut self.ebpf)?
                .attach_to_link(link)
                .map_err(|source| XdpError::Attach {
                    interface: interface.to_owned(),
                    mode,
                    source,
                })?;
            self.links.push((interface.to_owned(), id));
            return Ok(Attached::Adopted);
        }
        let program = program(&mut self.ebpf)?;
        let id = program
            .attach(interface, mode)
            .map_err(|source| XdpError::Attach {
                interface: interface.to_owned(),
                mode,
                source,
            })?;
        let pin_error = |source: Box<dyn std::error::Error + Send + Sync>| XdpError::PinLink {
            interface: interface.to_owned(),
            path: path.clone(),
            source,
        };
        let link = program.take_link(id).map_err(|e| pin_error(Box::new(e)))?;
        let pinned = FdLink::try_from(link)
            .map_err(|e| pin_error(Box::new(e)))?
            .pin(&path)
            .map_err(|e| pin_error(Box::new(e)))?;
        self.pinned_links.push((interface.to_owned(), pinned));
        Ok(Attached::New)
    }

    /// Every channel in the kernel's maps, e.g. left by a previous agent (the client-direction
    /// entries, with the next hop of their peer-direction entry where there is one).
    pub fn channel_bindings(&self) -> Result<Vec<ChannelBinding>, XdpError> {
        let map = HashMap::<_, ClientChannelKey, ClientChannelValue>::try_from(
            self.map(CLIENT_CHANNELS_MAP)?,
        )
        .map_err(map_error(CLIENT_CHANNELS_MAP))?;
        let peers =
            HashMap::<_, PeerChannelKey, PeerChannelValue>::try_from(self.map(PEER_CHANNELS_MAP)?)
                .map_err(map_error(PEER_CHANNELS_MAP))?;
        map.iter()
            .map(|entry| {
                let (key, value) = entry.map_err(map_error(CLIENT_CHANNELS_MAP))?;
                let peer_key = PeerChannelKey {
                    relay: value.relay,
                    peer: value.peer,
                };
                Ok(ChannelBinding {
                    client: key.client.socket_addr(),
                    server: key.server.socket_addr(),
                    relay: value.relay.socket_addr(),
                    peer: value.peer.socket_addr(),
                    channel: key.channel,
                    counter_id: value.counter_id,
                    expires_ns: value.expires_ns,
                    to_peer: value.next_hop,
                    to_client: peers
                        .get(&peer_key, 0)
                        .map_or(NextHop::NONE, |v| v.next_hop),
                    limit: value.limit,
                    budget_id: value.budget_id,
                    budget_generation: value.budget_generation,
                })
            })
            .collect()
    }

    /// Removes peer-direction entries that no client-direction entry accounts for
    /// (half-written by an agent that died mid-update); returns how many went. (Counter slots
    /// need no cleaning: a slot is zeroed when it is given to a new channel.)
    pub fn remove_orphans(&mut self) -> Result<usize, XdpError> {
        let bindings = self.channel_bindings()?;
        let keys: std::collections::HashSet<PeerChannelKey> = bindings
            .iter()
            .filter_map(|b| b.keys().ok().map(|(_, peer_key)| peer_key))
            .collect();
        let mut peer_map = self.peer_map()?;
        let orphan_peers: Vec<PeerChannelKey> = peer_map
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !keys.contains(k))
            .collect();
        for key in &orphan_peers {
            ignore_missing(peer_map.remove(key)).map_err(map_error(PEER_CHANNELS_MAP))?;
        }
        Ok(orphan_peers.len())
    }

    /// Attaches the program to `interface` (a name in the calling thread's network namespace).
    ///
    /// `XdpMode::Skb` (generic XDP) works on every device; `XdpMode::Driver` needs driver
    /// support (veth, most physical NICs) and is where the fast path is fast.
    /// Attaching to an interface the program is already attached to does nothing.
    pub fn attach(&mut self, interface: &str, mode: XdpMode) -> Result<(), XdpError> {
        if self.is_attached(interface) {
            return Ok(());
        }
        let link = program(&mut self.ebpf)?
            .attach(interface, mode)
            .map_err(|source| XdpError::Attach {
                interface: interface.to_owned(),
                mode,
                source,
            })?;
        self.links.push((interface.to_owned(), link));
        Ok(())
    }

    /// Detaches the program from `interface`; the program stays loaded and its counters keep
    /// their values.
    pub fn detach(&mut self, interface: &str) -> Result<(), XdpError> {
        let position = self
            .links
            .iter()
            .position(|(name, _)| name == interface)
            .ok_or_else(|| XdpError::NotAttached(interface.to_owned()))?;
        let (interface, link) = self.links.swap_remove(position);
        program(&mut self.ebpf)?
            .detach(link)
            .map_err(|source| XdpError::Detach { interface, source })
    }

    /// Whether [`XdpProgram::attach`] succeeded on `interface` and it was not detached since.
    pub fn is_attached(&self, interface: &str) -> bool {
        self.links.iter().any(|(name, _)| name == interface)
    }

    /// The count for `stat`, summed over all CPUs ([`Stat::Seen`]: over every other slot).
    pub fn counter(&self, stat: Stat) -> Result<Counter, XdpError> {
        if stat == Stat::Seen {
            return Ok(self
                .stats()?
                .iter()
                .find(|(s, _)| *s == Stat::Seen)
                .map(|(_, c)| *c)
                .unwrap_or_default());
        }
        self.slot(stat)
    }

    fn slot(&self, stat: Stat) -> Result<Counter, XdpError> {
        let stats = PerCpuArray::<_, Counter>::try_from(self.map(STATS_MAP)?)
            .map_err(map_error(STATS_MAP))?;
        let per_cpu = stats.get(&stat.index(), 0).map_err(map_error(STATS_MAP))?;
        Ok(per_cpu
            .iter()
            .fold(Counter::default(), |sum, cpu| add_counters(sum, *cpu)))
    }

    /// Every [`Stat`] with its count, in index order.
    pub fn stats(&self) -> Result<Vec<(Stat, Counter)>, XdpError> {
        let mut stats = Stat::ALL
            .iter()
            .map(|&stat| Ok((stat, self.slot(stat)?)))
            .collect::<Result<Vec<_>, XdpError>>()?;
        // The program counts each frame in one slot; Seen is their sum.
        let seen = stats
            .iter()
            .filter(|(stat, _)| *stat != Stat::Seen)
            .fold(Counter::default(), |sum, (_, c)| add_counters(sum, *c));
        for (stat, counter) in &mut stats {
            if *stat == Stat::Seen {
                *counter = seen;
            }
        }
        Ok(stats)
    }

    /// Has the kernel forward `binding`'s channel both ways, or refreshes it (new expiry or next
    /// hops; the counters keep counting if the channel keeps its counter id). Each entry is
    /// replaced whole, so the program sees either the old or the new one. If one write fails,
    /// this call's other entry is removed again.
    pub fn bind_channel(&mut self, binding: &ChannelBinding) -> Result<(), XdpError> {
        let (client_key, peer_key) = binding.keys()?;
        let client_value = ClientChannelValue {
            relay: peer_key.relay,
            peer: peer_key.peer,
            expires_ns: binding.expires_ns,
            counter_id: binding.counter_id,
            next_hop: binding.to_peer,
            budget_id: binding.budget_id,
            budget_generation: binding.budget_generation,
            limit: binding.limit,
        };
        let peer_value = PeerChannelValue {
            client: client_key.client,
            server: client_key.server,
            expires_ns: binding.expires_ns,
            counter_id: binding.counter_id,
            channel: binding.channel,
            _pad: [0; 2],
            next_hop: binding.to_client,
            budget_id: binding.budget_id,
            budget_generation: binding.budget_generation,
            _pad2: [0; 4],
            limit: binding.limit,
        };

        // Counters first, so the kernel never forwards into another channel's: a slot new to
        // this channel starts at zero, a refresh keeps counting.
        let refresh = self
            .client_map()?
            .get(&client_key, 0)
            .is_ok_and(|v| v.counter_id == binding.counter_id);
        if !refresh {
            self.reset_channel_counters(binding.counter_id)?;
        }

        self.client_map()?
            .insert(client_key, client_value, 0)
            .map_err(map_error(CLIENT_CHANNELS_MAP))?;
        if let Err(e) = self.peer_map()?.insert(peer_key, peer_value, 0) {
            let _ = self.client_map()?.remove(&client_key);
            return Err(map_error(PEER_CHANNELS_MAP)(e));
        }
        Ok(())
    }

    /// Stops forwarding `binding`'s channel in the kernel and zeroes its counters, returning
    /// their last values. Entries already gone are fine (unbinding is idempotent).
    pub fn unbind_channel(
        &mut self,
        binding: &ChannelBinding,
    ) -> Result<ChannelCounters, XdpError> {
        let (client_key, peer_key) = binding.keys()?;
        ignore_missing(self.client_map()?.remove(&client_key))
            .map_err(map_error(CLIENT_CHANNELS_MAP))?;
        ignore_missing(self.peer_map()?.remove(&peer_key)).map_err(map_error(PEER_CHANNELS_MAP))?;
        let last = self.channel_counters(binding.counter_id)?;
        self.reset_channel_counters(binding.counter_id)?;
        Ok(last)
    }

    /// Zeroes the counters at `counter_id` on every CPU.
    fn reset_channel_counters(&mut self, counter_id: u32) -> Result<(), XdpError> {
        let cpus = nr_cpus().map_err(|(what, e)| XdpError::Cpus(what, e))?;
        let zeros = PerCpuValues::try_from(vec![ChannelCounters::default(); cpus])
            .map_err(|e| XdpError::Cpus("one value per possible CPU", e))?;
        self.counters_map()?
            .set(counter_id, zeros, 0)
            .map_err(map_error(CHANNEL_COUNTERS_MAP))
    }

    /// Each CPU's share of the total limit in `direction`, as the program left it (its
    /// `offered_bytes` is the CPU's demand so far).
    pub fn total_shares(&self, direction: TotalDirection) -> Result<Vec<TotalShare>, XdpError> {
        let shares = PerCpuArray::<_, TotalShare>::try_from(self.map(TOTAL_MAP)?)
            .map_err(map_error(TOTAL_MAP))?;
        Ok(shares
            .get(&(direction as u32), 0)
            .map_err(map_error(TOTAL_MAP))?
            .iter()
            .copied()
            .collect())
    }

    /// Gives each CPU its share of the total limit in `direction` (`limits`, one per possible
    /// CPU). Read and written back whole: what the program added in between to a CPU's
    /// arrival time and demand is lost, which a tenth of a second's rebalancing tolerates.
    pub fn set_total_shares(
        &mut self,
        direction: TotalDirection,
        limits: &[Limit],
    ) -> Result<(), XdpError> {
        let mut shares = self.total_shares(direction)?;
        for (share, limit) in shares.iter_mut().zip(limits) {
            share.limit = *limit;
        }
        let values = PerCpuValues::try_from(shares)
            .map_err(|e| XdpError::Cpus("one value per possible CPU", e))?;
        PerCpuArray::<_, TotalShare>::try_from(self.map_mut(TOTAL_MAP)?)
            .map_err(map_error(TOTAL_MAP))?
            .set(direction as u32, values, 0)
            .map_err(map_error(TOTAL_MAP))
    }

    /// Sets the flags of the fallback FIB lookup (for bindings without a cached next hop):
    /// [`FIB_LOOKUP_DIRECT`] when the host has no policy-routing rules beyond the default ones.
    pub fn set_fib_flags(&mut self, fib_flags: u32) -> Result<(), XdpError> {
        let mut settings = Array::<_, Settings>::try_from(self.map_mut(SETTINGS_MAP)?)
            .map_err(map_error(SETTINGS_MAP))?;
        settings
            .set(0, Settings { fib_flags }, 0)
            .map_err(map_error(SETTINGS_MAP))
    }

    /// A channel's counters, summed over all CPUs.
    pub fn channel_counters(&self, counter_id: u32) -> Result<ChannelCounters, XdpError> {
        let counters = PerCpuArray::<_, ChannelCounters>::try_from(self.map(CHANNEL_COUNTERS_MAP)?)
            .map_err(map_error(CHANNEL_COUNTERS_MAP))?;
        let per_cpu = counters
            .get(&counter_id, 0)
            .map_err(map_error(CHANNEL_COUNTERS_MAP))?;
        Ok(per_cpu
            .iter()
            .fold(ChannelCounters::default(), |sum, cpu| sum.add(*cpu)))
    }

    /// The counters of every channel slot below `slots`, summed over CPUs, read with batched
    /// lookups (`BPF_MAP_LOOKUP_BATCH`, [`COUNTER_BATCH`] slots per system call) rather than
    /// one call per channel: what a report reads, off the data path. aya 0.14 has no batch
    /// operations, hence the raw `bpf()` call.
    pub fn channel_counters_batch(&self, slots: u32) -> Result<Vec<ChannelCounters>, XdpError> {
        let Map::PerCpuArray(data) = self.map(CHANNEL_COUNTERS_MAP)? else {
            return Err(XdpError::MapMissing(CHANNEL_COUNTERS_MAP));
        };
        let batch_error = |source| XdpError::Batch {
            map: CHANNEL_COUNTERS_MAP,
            source,
        };
        let cpus = nr_cpus().map_err(|(_, source)| batch_error(source))?;
        let fd = data.fd().as_fd().as_raw_fd();
        let mut keys = vec![0u32; COUNTER_BATCH as usize];
        // Per-CPU values come as one value per possible CPU, each padded to 8 bytes, which
        // ChannelCounters (eight u64) already is.
        let mut values = vec![ChannelCounters::default(); COUNTER_BATCH as usize * cpus];
        let mut summed = Vec::with_capacity(slots as usize);
        let (mut next, mut started) = (0u32, false);
        while (summed.len() as u32) < slots {
            let position = next;
            let mut attr = BatchAttr {
                in_batch: if started {
                    (&raw const position) as u64
                } else {
                    0
                },
                out_batch: (&raw mut next) as u64,
                keys: keys.as_mut_ptr() as u64,
                values: values.as_mut_ptr() as u64,
                count: COUNTER_BATCH.min(slots - summed.len() as u32),
                map_fd: fd as u32,
                elem_flags: 0,
                flags: 0,
            };
            // SAFETY: `attr` is the kernel's `bpf_attr.batch` layout; every pointer in it is to
            // a buffer with room for `count` keys and `count * cpus` values.
            let rc = unsafe {
                libc::syscall(
                    libc::SYS_bpf,
                    BPF_MAP_LOOKUP_BATCH,
                    &raw mut attr,
                    size_of::<BatchAttr>(),
                )
            };
            // ENOENT: the end of the map, with `count` elements still filled in.
            let end =
                rc != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ENOENT);
            if rc != 0 && !end {
                return Err(batch_error(std::io::Error::last_os_error()));
            }
            let filled = (attr.count as usize).min(keys.len());
            for per_cpu in values.chunks_exact(cpus).take(filled) {
                summed.push(
                    per_cpu
                        .iter()
                        .fold(ChannelCounters::default(), |sum, cpu| sum.add(*cpu)),
                );
            }
            started = true;
            if end || filled == 0 {
                break;
            }
        }
        summed.truncate(slots as usize);
        Ok(summed)
    }

    /// Lets the program send rewritten frames out of `interface` (a name in the calling
    /// thread's network namespace) when it is not the one they came in on. Returns its index.
    pub fn add_egress_interface(&mut self, interface: &str) -> Result<u32, XdpError> {
        let ifindex = ifindex(interface)?;
        self.add_egress_ifindex(ifindex)?;
        Ok(ifindex)
    }

    /// [`XdpProgram::add_egress_interface`] by interface index.
    pub fn add_egress_ifindex(&mut self, ifindex: u32) -> Result<(), XdpError> {
        let mut egress =
            DevMapHash::try_from(self.map_mut(EGRESS_MAP)?).map_err(map_error(EGRESS_MAP))?;
        egress
            .insert(ifindex, ifindex, None, 0)
            .map_err(|source| XdpError::Egress { ifindex, source })
    }

    /// Stops redirecting to `ifindex`; frames routed there go to userspace. Idempotent.
    pub fn remove_egress_ifindex(&mut self, ifindex: u32) -> Result<(), XdpError> {
        let mut egress =
            DevMapHash::try_from(self.map_mut(EGRESS_MAP)?).map_err(map_error(EGRESS_MAP))?;
        ignore_missing(egress.remove(ifindex)).map_err(map_error(EGRESS_MAP))
    }

    /// Runs the program `repeat` times (at least once) on `frame` in the kernel
    /// (`BPF_PROG_TEST_RUN`), as if it had arrived on interface `ingress_ifindex` (in the
    /// calling thread's network namespace; 0 for none, then FIB lookups fail). Nothing is
    /// transmitted: the action is reported, not carried out. Maps and counters are the real
    /// ones. With `repeat` > 1 every run sees the previous run's output frame.
    pub fn test_run(
        &self,
        frame: &[u8],
        ingress_ifindex: u32,
        repeat: u32,
    ) -> Result<TestRunOutput, XdpError> {
        self.test_run_program(PROGRAM_NAME, frame, ingress_ifindex, repeat)
    }

    /// Loads the benchmark's [`Yardstick`]s (in the same object) so that
    /// [`XdpProgram::reference_test_run`] can measure them beside this program. The agent
    /// never calls this.
    pub fn load_reference(&mut self) -> Result<(), XdpError> {
        for yardstick in [Yardstick::Reference, Yardstick::ReferenceWithCall] {
            let name = yardstick.program_name();
            program_named(&mut self.ebpf, name)?
                .load()
                .map_err(|e| XdpError::Verify(name, e))?;
        }
        Ok(())
    }

    /// [`XdpProgram::test_run`] of a yardstick (after [`XdpProgram::load_reference`]).
    pub fn reference_test_run(
        &self,
        yardstick: Yardstick,
        frame: &[u8],
        ingress_ifindex: u32,
        repeat: u32,
    ) -> Result<TestRunOutput, XdpError> {
        self.test_run_program(yardstick.program_name(), frame, ingress_ifindex, repeat)
    }

    fn test_run_program(
        &self,
        name: &'static str,
        frame: &[u8],
        ingress_ifindex: u32,
        repeat: u32,
    ) -> Result<TestRunOutput, XdpError> {
        let program: &Xdp = self
            .ebpf
            .program(name)
            .ok_or(XdpError::ProgramMissing(name))?
            .try_into()
            .map_err(|_: ProgramError| XdpError::ProgramMissing(name))?;
        // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index,
        // egress_ifindex. The kernel wants data = data_meta = 0 and data_end = the frame length.
        let fields = [0, frame.len() as u32, 0, ingress_ifindex, 0, 0];
        let ctx: Vec<u8> = fields.iter().flat_map(|f| f.to_ne_bytes()).collect();
        // Room for the largest growth (IPv4 -> IPv6 plus the ChannelData header).
        let mut out = vec![0u8; frame.len() + 256];
        let result = program
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ctx_in: Some(&ctx),
                repeat: repeat.max(1),
                ..TestRunOptions::default()
            })
            .map_err(XdpError::TestRun)?;
        out.truncate(result.data_size_out as usize);
        Ok(TestRunOutput {
            action: result.return_value,
            frame: out,
            duration: result.duration,
        })
    }

    fn map(&self, name: &'static str) -> Result<&Map, XdpError> {
        self.ebpf.map(name).ok_or(XdpError::MapMissing(name))
    }

    fn map_mut(&mut self, name: &'static str) -> Result<&mut Map, XdpError> {
        self.ebpf.map_mut(name).ok_or(XdpError::MapMissing(name))
    }

    fn client_map(
        &mut self,
    ) -> Result<HashMap<&mut MapData, ClientChannelKey, ClientChannelValue>, XdpError> {
        HashMap::try_from(self.map_mut(CLIENT_CHANNELS_MAP)?)
            .map_err(map_error(CLIENT_CHANNELS_MAP))
    }

    fn peer_map(
        &mut self,
    ) -> Result<HashMap<&mut MapData, PeerChannelKey, PeerChannelValue>, XdpError> {
        HashMap::try_from(self.map_mut(PEER_CHANNELS_MAP)?).map_err(map_error(PEER_CHANNELS_MAP))
    }

    fn counters_map(&mut self) -> Result<PerCpuArray<&mut MapData, ChannelCounters>, XdpError> {
        PerCpuArray::try_from(self.map_mut(CHANNEL_COUNTERS_MAP)?)
            .map_err(map_error(CHANNEL_COUNTERS_MAP))
    }
}

fn add_counters(a: Counter, b: Counter) -> Counter {
    Counter {
        packets: a.packets.wrapping_add(b.packets),
        bytes: a.bytes.wrapping_add(b.bytes),
    }
}

/// The maps that outlive the agent: the channels and their counters (so forwarding goes on),
/// the egress devmap (so redirects keep working), the fallback lookup's settings and the
/// program's statistics. (The bandwidth budgets are the program's own data: a new program
/// starts them empty, which lets each limited allocation one burst more.)
const PINNED_MAPS: [&str; 6] = [
    CLIENT_CHANNELS_MAP,
    PEER_CHANNELS_MAP,
    CHANNEL_COUNTERS_MAP,
    EGRESS_MAP,
    SETTINGS_MAP,
    STATS_MAP,
];

/// Creates `directory`, mounting bpffs on /sys/fs/bpf first if it is not mounted there (as on
/// a fresh Debian host).
fn prepare_pin_directory(directory: &Path) -> Result<(), XdpError> {
    let fail = |path: &Path| {
        let path = path.to_owned();
        move |source| XdpError::PinDirectory { path, source }
    };
    if directory.starts_with(BPF_FS) && !is_bpffs(Path::new(BPF_FS)) {
        std::fs::create_dir_all(BPF_FS).map_err(fail(Path::new(BPF_FS)))?;
        let target = std::ffi::CString::new(BPF_FS).expect("no NUL");
        // SAFETY: valid NUL-terminated strings; no data argument.
        let rc = unsafe {
            libc::mount(
                c"bpf".as_ptr(),
                target.as_ptr(),
                c"bpf".as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        if rc != 0 {
            return Err(fail(Path::new(BPF_FS))(std::io::Error::last_os_error()));
        }
        tracing::info!("mounted bpffs on {BPF_FS}");
    }
    std::fs::create_dir_all(directory).map_err(fail(directory))
}

fn is_bpffs(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt as _;
    let Ok(c_path) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: a valid path and an out-struct of the right type.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statfs(c_path.as_ptr(), &mut stat) };
    rc == 0 && stat.f_type as i64 == BPF_FS_MAGIC
}

fn map_error(map: &'static str) -> impl Fn(MapError) -> XdpError {
    move |source| XdpError::Map { map, source }
}

/// Load an object that `build.rs` embedded (empty when built with `AYA_BUILD_SKIP=1`).
fn load_embedded(object: &[u8]) -> Result<Ebpf, XdpError> {
    if object.is_empty() {
        return Err(XdpError::NotBuilt);
    }
    Ebpf::load(object).map_err(XdpError::Load)
}

/// The map `name` of `ebpf` as a `T`.
fn typed_map<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<T, XdpError>
where
    T: TryFrom<&'a mut Map, Error = MapError>,
{
    let map = ebpf.map_mut(name).ok_or(XdpError::MapMissing(name))?;
    T::try_from(map).map_err(map_error(name))
}

/// The program `name` of `ebpf` as a `P`, not yet loaded.
fn typed_program<'a, P>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut P, XdpError>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(XdpError::ProgramMissing(name))?
        .try_into()
        .map_err(|source| XdpError::Verify(name, source))
}

fn is_errno(error: &MapError, errno: i32) -> bool {
    matches!(error, MapError::SyscallError(e) if e.io_error.raw_os_error() == Some(errno))
}

/// A removal of an entry that is not there is a success.
fn ignore_missing(result: Result<(), MapError>) -> Result<(), MapError> {
    match result {
        Err(e) if is_errno(&e, libc::ENOENT) || matches!(e, MapError::KeyNotFound) => Ok(()),
        other => other,
    }
}

/// The index of `interface` in the calling thread's network namespace.
fn ifindex(interface: &str) -> Result<u32, XdpError> {
    let name = std::ffi::CString::new(interface)
        .map_err(|_| XdpError::NoSuchInterface(interface.to_owned()))?;
    // SAFETY: a valid NUL-terminated string.
    match unsafe { libc::if_nametoindex(name.as_ptr()) } {
        0 => Err(XdpError::NoSuchInterface(interface.to_owned())),
        index => Ok(index),
    }
}

fn program(ebpf: &mut Ebpf) -> Result<&mut Xdp, XdpError> {
    program_named(ebpf, PROGRAM_NAME)
}

fn program_named<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut Xdp, XdpError> {
    ebpf.program_mut(name)
        .ok_or(XdpError::ProgramMissing(name))?
        .try_into()
        .map_err(|_: ProgramError| XdpError::ProgramMissing(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_object_is_a_bpf_elf() {
        if OBJECT.is_empty() {
            eprintln!("SKIP: built with AYA_BUILD_SKIP=1, no XDP object embedded");
            return;
        }
        assert_eq!(&OBJECT[..4], b"\x7fELF", "not an ELF file");
        // e_machine (offset 18, little endian) = EM_BPF (247).
        assert_eq!(
            u16::from_le_bytes([OBJECT[18], OBJECT[19]]),
            247,
            "not a BPF object"
        );
    }
}
