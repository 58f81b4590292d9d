//! A two-armed edge in network namespaces, for the XDP fast path's end-to-end tests:
//!
//! ```text
//!  client ns            edge ns (rampart)                   peer ns
//!  c0  <-- veth -->  e0 (external)   i0 (internal)  <-- veth -->  p0
//!  10.201.1.2        10.201.1.1      10.201.2.1                   10.201.2.2
//!  fd00:201:1::2     fd00:201:1::1   fd00:201:2::1                fd00:201:2::2
//! ```
//!
//! The TURN server listens on the edge's external addresses and relays from its internal ones,
//! as at a real edge with two NICs. The client reaches only the external subnet and the peer
//! only the internal one (each has just the on-link route of its link, no default route), so
//! the only way data gets from one to the other is through the relay; the edge forwards
//! nothing by routing for them.
//!
//! The three namespaces, and with them the veth pairs (created directly inside them, never in
//! the host's namespace), are deleted when the value is dropped, also when a test panics.

use std::ffi::CString;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use anyhow::{Context, bail};
use nix::libc;

use crate::netns::{self, Netns};
use crate::{Proto, RampartConfig};

/// The edge's external interface (towards the client) and internal one (towards the peer).
pub const EDGE_EXT_IF: &str = "e0";
pub const EDGE_INT_IF: &str = "i0";
pub const CLIENT_IF: &str = "c0";
pub const PEER_IF: &str = "p0";

pub const EDGE_EXT4: Ipv4Addr = Ipv4Addr::new(10, 201, 1, 1);
pub const CLIENT4: Ipv4Addr = Ipv4Addr::new(10, 201, 1, 2);
pub const EDGE_INT4: Ipv4Addr = Ipv4Addr::new(10, 201, 2, 1);
pub const PEER4: Ipv4Addr = Ipv4Addr::new(10, 201, 2, 2);
pub const EDGE_EXT6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x201, 1, 0, 0, 0, 0, 1);
pub const CLIENT6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x201, 1, 0, 0, 0, 0, 2);
pub const EDGE_INT6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x201, 2, 0, 0, 0, 0, 1);
pub const PEER6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x201, 2, 0, 0, 0, 0, 2);
/// The internal subnets: where peers may be (`relay.allowed_peer_networks`).
pub const INTERNAL_NETS: [&str; 2] = ["10.201.2.0/24", "fd00:201:2::/64"];

pub const EDGE_EXT_MAC: &str = "02:00:00:c9:01:01";
pub const CLIENT_MAC: &str = "02:00:00:c9:01:02";
pub const EDGE_INT_MAC: &str = "02:00:00:c9:02:01";
pub const PEER_MAC: &str = "02:00:00:c9:02:02";

/// What the UDP checksums of the datagrams the client and the peer send look like when they
/// reach the edge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SenderChecksums {
    /// Complete, as in a frame from a wire: TX checksum offload is off on c0 and p0, so their
    /// stacks compute the checksum in full before the frame crosses the veth.
    Complete,
    /// veth's default: TX checksum offload on, so a datagram crosses the veth as
    /// CHECKSUM_PARTIAL, its checksum field holding only the pseudo-header sum that a NIC
    /// would complete. XDP sees the bytes, not that flag; after an XDP_REDIRECT the frame is
    /// a plain frame again and the receiver verifies the field as it is. This is what
    /// datagrams from processes on the same host (containers, a co-located media server)
    /// look like.
    Deferred,
}

/// The hosts of the topology. Fields drop in declaration order: the receive-side XDP links
/// first, then the namespaces.
pub struct EdgeTopology {
    _receivers: Vec<OwnedFd>,
    pub client: Netns,
    pub edge: Netns,
    pub peer: Netns,
}

impl EdgeTopology {
    /// Builds the topology; None (after saying why) when this process may not create
    /// namespaces and is not under CI (see [`netns::can_create`]).
    pub fn create(test: &str, checksums: SenderChecksums) -> anyhow::Result<Option<EdgeTopology>> {
        if !netns::can_create(test) {
            return Ok(None);
        }
        let client = Netns::create()?;
        let edge = Netns::create()?;
        let peer = Netns::create()?;
        let mut topology = EdgeTopology {
            _receivers: Vec::new(),
            client,
            edge,
            peer,
        };
        topology
            .build(checksums)
            .context("building the edge topology")?;
        Ok(Some(topology))
    }

    pub fn client_ip(&self, v6: bool) -> IpAddr {
        pick(v6, CLIENT4, CLIENT6)
    }

    pub fn peer_ip(&self, v6: bool) -> IpAddr {
        pick(v6, PEER4, PEER6)
    }

    /// Where the TURN server listens.
    pub fn edge_external_ip(&self, v6: bool) -> IpAddr {
        pick(v6, EDGE_EXT4, EDGE_EXT6)
    }

    /// Where the relay allocates.
    pub fn edge_internal_ip(&self, v6: bool) -> IpAddr {
        pick(v6, EDGE_INT4, EDGE_INT6)
    }

    fn build(&mut self, checksums: SenderChecksums) -> anyhow::Result<()> {
        let (c, e, p) = (&self.client, &self.edge, &self.peer);
        // bpf_fib_lookup (flags 0, as for a forwarded packet) answers "forwarding disabled"
        // unless the ingress interface forwards; the fast path then leaves every packet to
        // userspace. A real edge that relays between its NICs has forwarding on too.
        for setting in [
            "net.ipv4.conf.all.forwarding=1",
            "net.ipv4.conf.default.forwarding=1",
            "net.ipv6.conf.all.forwarding=1",
            "net.ipv6.conf.default.forwarding=1",
        ] {
            e.sysctl(setting)?;
        }
        // Each pair is made inside the edge namespace with its far end moved at once, so no
        // interface of the test ever exists in the host's namespace.
        for (edge_if, edge_mac, far, far_if, far_mac) in [
            (EDGE_EXT_IF, EDGE_EXT_MAC, c, CLIENT_IF, CLIENT_MAC),
            (EDGE_INT_IF, EDGE_INT_MAC, p, PEER_IF, PEER_MAC),
        ] {
            let link = format!(
                "link add {edge_if} address {edge_mac} type veth \
                 peer name {far_if} address {far_mac} netns {}",
                far.name()
            );
            e.ip(&link.split_whitespace().collect::<Vec<_>>())?;
        }
        let addresses: [(&Netns, &str, String); 8] = [
            (c, CLIENT_IF, format!("{CLIENT4}/24")),
            (c, CLIENT_IF, format!("{CLIENT6}/64")),
            (e, EDGE_EXT_IF, format!("{EDGE_EXT4}/24")),
            (e, EDGE_EXT_IF, format!("{EDGE_EXT6}/64")),
            (e, EDGE_INT_IF, format!("{EDGE_INT4}/24")),
            (e, EDGE_INT_IF, format!("{EDGE_INT6}/64")),
            (p, PEER_IF, format!("{PEER4}/24")),
            (p, PEER_IF, format!("{PEER6}/64")),
        ];
        for (ns, dev, cidr) in &addresses {
            // The prefix gives each host the on-link route to its side of the edge, and only
            // that. nodad: usable at once rather than "tentative" for a second or two.
            let mut args = vec!["addr", "add", cidr.as_str(), "dev", dev];
            if cidr.contains(':') {
                args.push("nodad");
            }
            ns.ip(&args)?;
        }
        for (ns, dev) in [
            (c, CLIENT_IF),
            (e, EDGE_EXT_IF),
            (e, EDGE_INT_IF),
            (p, PEER_IF),
        ] {
            ns.ip(&["link", "set", dev, "up"])?;
        }
        // Permanent neighbour entries on the edge for the client and the peer: the XDP
        // program's FIB lookup resolves the next hop's MAC from the neighbour table and does
        // not resolve a missing one itself (it leaves that packet to the kernel stack, and so
        // to userspace). With these, the kernel path is taken from the very first packet, and
        // the test can require that userspace sees none of the media. The client and the peer
        // get the edge's entries too, so no host waits for ARP or neighbour discovery.
        let neighbours: [(&Netns, IpAddr, &str, &str); 8] = [
            (e, CLIENT4.into(), CLIENT_MAC, EDGE_EXT_IF),
            (e, CLIENT6.into(), CLIENT_MAC, EDGE_EXT_IF),
            (e, PEER4.into(), PEER_MAC, EDGE_INT_IF),
            (e, PEER6.into(), PEER_MAC, EDGE_INT_IF),
            (c, EDGE_EXT4.into(), EDGE_EXT_MAC, CLIENT_IF),
            (c, EDGE_EXT6.into(), EDGE_EXT_MAC, CLIENT_IF),
            (p, EDGE_INT4.into(), EDGE_INT_MAC, PEER_IF),
            (p, EDGE_INT6.into(), EDGE_INT_MAC, PEER_IF),
        ];
        for (ns, ip, mac, dev) in neighbours {
            let ip = ip.to_string();
            ns.ip(&[
                "neigh",
                "replace",
                &ip,
                "lladdr",
                mac,
                "dev",
                dev,
                "nud",
                "permanent",
            ])?;
        }
        // A frame that native XDP on e0 redirects to i0 (bpf_redirect_map -> veth's
        // ndo_xdp_xmit) is not sent like a packet from the stack: veth puts it straight on the
        // receive ring of i0's peer, p0, and only p0's NAPI serves that ring. veth runs NAPI
        // on a device only while an XDP program is attached to it or GRO is on for it
        // (drivers/net/veth.c, veth_xdp_xmit: "The napi pointer is set if NAPI is enabled");
        // otherwise the frame is refused and dropped (counted in e0's `rx_queue_0_drops`)
        // after our program has counted it as forwarded. The same holds for frames redirected
        // from i0 to e0 and the client's c0. Seen on 6.18: with neither, nothing arrives; with
        // either (`ethtool -K p0 gro on`, or a program), everything does. A physical NIC has
        // its rings anyway. The receiving ends get a program that passes everything, which
        // needs no tool.
        self._receivers = vec![
            attach_xdp_pass(c.name(), CLIENT_IF)?,
            attach_xdp_pass(p.name(), PEER_IF)?,
        ];
        if checksums == SenderChecksums::Complete {
            for (ns, dev) in [(c, CLIENT_IF), (p, PEER_IF)] {
                set_tx_checksum_offload(ns.name(), dev, false)?;
            }
        }
        Ok(())
    }
}

impl EdgeTopology {
    /// Detaches the programs that make the client's and the peer's veths receive redirected
    /// frames, for a caller that attaches receiving programs of its own there (native XDP
    /// holds one program per interface).
    pub fn detach_receivers(&mut self) {
        self._receivers.clear();
    }

    /// Turns GRO on for the edge's two veths. A veth serves frames redirected into it from
    /// its peer (by XDP, or by `BPF_PROG_RUN` in live-frames mode) only with NAPI, which it
    /// runs while an XDP program is attached or GRO is on: an edge whose relay attaches no
    /// program would otherwise drop them (see `build`).
    pub fn enable_edge_gro(&self) -> anyhow::Result<()> {
        for dev in [EDGE_EXT_IF, EDGE_INT_IF] {
            set_gro(self.edge.name(), dev, true)?;
        }
        Ok(())
    }

    /// The agent's configuration for this topology: UDP listeners on the edge's external
    /// addresses, relays on its internal ones (peers on the internal subnets allowed), XDP in
    /// `xdp_mode` on both edge interfaces, counters every second, run in the edge namespace.
    pub fn agent_config(&self, xdp_mode: &str) -> RampartConfig {
        let mut config = RampartConfig::loopback(&[
            (Proto::Udp, self.edge_external_ip(false)),
            (Proto::Udp, self.edge_external_ip(true)),
        ])
        .with_xdp(xdp_mode, &[EDGE_EXT_IF, EDGE_INT_IF])
        .with_stats_interval(1)
        .in_netns(self.edge.name());
        config.relay_ipv4 = match self.edge_internal_ip(false) {
            IpAddr::V4(ip) => Some(ip),
            IpAddr::V6(_) => None,
        };
        config.relay_ipv6 = match self.edge_internal_ip(true) {
            IpAddr::V6(ip) => Some(ip),
            IpAddr::V4(_) => None,
        };
        config.allowed_peer_networks = INTERNAL_NETS.iter().map(|n| (*n).to_owned()).collect();
        config
    }
}

impl EdgeTopology {
    /// What the hosts' kernels saw, for a failure message: interface statistics (veth's XDP
    /// counters too, when ethtool is installed) and the UDP counters of each namespace
    /// (`InCsumErrors`: datagrams dropped for a bad checksum).
    pub fn diagnostics(&self) -> String {
        let mut out = String::from("----- diagnostics -----\n");
        let ethtool = crate::tools::find_on_path("ethtool").is_some();
        for (ns, dev) in [
            (&self.client, CLIENT_IF),
            (&self.edge, EDGE_EXT_IF),
            (&self.edge, EDGE_INT_IF),
            (&self.peer, PEER_IF),
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
        for ns in [&self.client, &self.edge, &self.peer] {
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
}

fn pick(v6: bool, v4: Ipv4Addr, v6_addr: Ipv6Addr) -> IpAddr {
    if v6 {
        IpAddr::V6(v6_addr)
    } else {
        IpAddr::V4(v4)
    }
}

/// Switches TX checksum offload of `dev` in namespace `ns` on or off (`ethtool -K <dev> tx
/// on|off`, through the ioctl, so no tool is needed).
fn set_tx_checksum_offload(ns: &str, dev: &str, on: bool) -> anyhow::Result<()> {
    const ETHTOOL_STXCSUM: u32 = 0x17;
    set_ethtool_value(ns, dev, ETHTOOL_STXCSUM, on)
        .with_context(|| format!("`ethtool -K {dev} tx {on}` in {ns}"))
}

/// Switches GRO of `dev` in namespace `ns` on or off (`ethtool -K <dev> gro on|off`).
fn set_gro(ns: &str, dev: &str, on: bool) -> anyhow::Result<()> {
    const ETHTOOL_SGRO: u32 = 0x2c;
    set_ethtool_value(ns, dev, ETHTOOL_SGRO, on)
        .with_context(|| format!("`ethtool -K {dev} gro {on}` in {ns}"))
}

/// An `ETHTOOL_S*` command that takes a `struct ethtool_value`, through SIOCETHTOOL.
fn set_ethtool_value(ns: &str, dev: &str, cmd: u32, on: bool) -> anyhow::Result<()> {
    /// `struct ethtool_value` (include/uapi/linux/ethtool.h).
    #[repr(C)]
    struct EthtoolValue {
        cmd: u32,
        data: u32,
    }
    netns::run_in(ns, || {
        // SAFETY: plain socket(2); the result is checked and owned below.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).context("socket for SIOCETHTOOL");
        }
        // SAFETY: a fresh descriptor nothing else owns.
        let socket = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut value = EthtoolValue {
            cmd,
            data: u32::from(on),
        };
        // SAFETY: all-zero is a valid `ifreq` (a name and a union of integers and pointers).
        let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
        if dev.len() >= request.ifr_name.len() {
            bail!("interface name {dev:?} too long");
        }
        for (slot, byte) in request.ifr_name.iter_mut().zip(dev.bytes()) {
            *slot = byte as libc::c_char;
        }
        request.ifr_ifru.ifru_data = std::ptr::from_mut(&mut value).cast();
        // SAFETY: `request` names the device and points at a live `ethtool_value`.
        let rc = unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCETHTOOL, &mut request) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error()).context("SIOCETHTOOL");
        }
        Ok(())
    })
}

/// `bpf(2)` commands and constants (include/uapi/linux/bpf.h, if_link.h).
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PROG_TYPE_XDP: u32 = 6;
const BPF_XDP: u32 = 37;
const XDP_FLAGS_DRV_MODE: u32 = 1 << 2;

/// The leading fields of `union bpf_attr` for BPF_PROG_LOAD; the kernel zero-fills the rest.
#[repr(C)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
}

/// The leading fields of `union bpf_attr` for BPF_LINK_CREATE.
#[repr(C)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_ifindex: u32,
    attach_type: u32,
    flags: u32,
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<OwnedFd> {
    // SAFETY: `attr` is a valid, initialised prefix of `union bpf_attr` of the size passed;
    // the kernel zero-extends a shorter attribute.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, cmd, std::ptr::from_mut(attr), size_of::<T>()) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let fd = i32::try_from(fd).map_err(|_| std::io::Error::other("fd out of range"))?;
    // SAFETY: the kernel just returned this descriptor to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Attaches a two-instruction XDP program (`return XDP_PASS`) to `dev` in namespace `ns`, in
/// native mode, through a BPF link: the program stays attached while the returned descriptor
/// is open (closing it, or deleting the namespace, detaches it).
fn attach_xdp_pass(ns: &str, dev: &str) -> anyhow::Result<OwnedFd> {
    netns::run_in(ns, || {
        // r0 = XDP_PASS (2); exit.
        let insns: [u64; 2] = [
            u64::from_le_bytes([0xb7, 0, 0, 0, 2, 0, 0, 0]),
            u64::from_le_bytes([0x95, 0, 0, 0, 0, 0, 0, 0]),
        ];
        let license = b"GPL\0";
        let mut name = [0u8; 16];
        name[..12].copy_from_slice(b"rampart_pass");
        let mut load = ProgLoadAttr {
            prog_type: BPF_PROG_TYPE_XDP,
            insn_cnt: 2,
            insns: insns.as_ptr() as u64,
            license: license.as_ptr() as u64,
            log_level: 0,
            log_size: 0,
            log_buf: 0,
            kern_version: 0,
            prog_flags: 0,
            prog_name: name,
        };
        let prog = bpf(BPF_PROG_LOAD, &mut load).context("loading an XDP_PASS program")?;
        let c_dev = CString::new(dev)?;
        // SAFETY: a valid NUL-terminated name; looked up in this thread's namespace.
        let ifindex = unsafe { libc::if_nametoindex(c_dev.as_ptr()) };
        if ifindex == 0 {
            bail!("no interface {dev} in namespace {ns}");
        }
        let mut link = LinkCreateAttr {
            prog_fd: u32::try_from(prog.as_raw_fd())?,
            target_ifindex: ifindex,
            attach_type: BPF_XDP,
            flags: XDP_FLAGS_DRV_MODE,
        };
        bpf(BPF_LINK_CREATE, &mut link)
            .with_context(|| format!("attaching XDP_PASS to {dev} in {ns} (native mode)"))
    })
}
