//! The XDP fast path outlives its agent, and a restarted agent cleans up after it: the test
//! kills the agent with SIGKILL while media flows on bound channels; packets keep flowing
//! through the pinned program; after their recorded expiry they stop; a restarted agent
//! reconciles the maps with no orphans left and forwards new channels in the kernel again.
//!
//! The topology is `xdp_topology`'s (a client, a two-armed edge running `rampart` with
//! `[xdp] mode = "native"` on e0 and i0, a UDP peer; each in a network namespace). The agent
//! pins its maps and links under `pin_path` on a bpffs the test mounts on a temporary
//! directory of its own: `ip netns exec` gives the agent a fresh /sys, so pins under
//! /sys/fs/bpf would die with it, and a private bpffs keeps concurrent tests from adopting each
//! other's pins.
//!
//! 1. An IPv4 and an IPv6 call (an allocation, a permission, a channel to a peer of the same
//!    family each). Media both ways arrives, and goes through XDP: the program's
//!    `forwarded_to_*` counters account for every frame, the userspace relay counters do not
//!    move.
//! 2. SIGKILL. The agent is gone (reaped, killed by signal 9; its listener answers nothing).
//!    More media both ways: all of it arrives, which only the kernel could have done, and the
//!    pinned maps (read with `bpftool`) show the program forwarded exactly that, per channel
//!    and in its statistics.
//! 3. Instead of waiting for the recorded expiry (minutes), the test rewrites `expires_ns` of
//!    every client- and peer-direction entry to one second from now (`bpftool map update`,
//!    CLOCK_MONOTONIC like `bpf_ktime_get_ns`), waits past it, and sends again: nothing
//!    arrives either way, and the program counts every one of those datagrams in
//!    `pass_expired`.
//! 4. A new agent with the same configuration takes over the pinned links (same link, new
//!    program, still attached in native mode; the old program is freed), reconciles the maps
//!    (`adopted=0 removed=2` for the two expired channels), and leaves the channel maps and the
//!    counters map empty: no orphans. A new call through it is forwarded in the kernel again.
//!
//! Needs root (namespaces, XDP, mounting bpffs) and bpftool; skipped with a message without
//! root, except under CI (`CI=true`), where it fails. Run: `cargo build -p relay-user && cargo
//! test -p rampart-tests --test xdp_restart`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io;
use std::mem::{offset_of, size_of};
use std::net::{SocketAddr, UdpSocket};
use std::os::unix::process::ExitStatusExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rampart_tests::bpf::{self, BpfFs, MapEntry, read_u32, read_u64};
use rampart_tests::media::{
    Channel, Count, Expect, Flow, client_to_peer, kernel_flow, messages, next_counters, number,
    peer_to_client, userspace_delta, xdp_delta,
};
use rampart_tests::netns::run_in;
use rampart_tests::topology::{EDGE_EXT_IF, EDGE_INT_IF, EdgeTopology, SenderChecksums};
use rampart_tests::{PASSWORD, Proto, Rampart, RampartConfig, Received, TurnClient, USER};
use rampart_turn::stun::{AddressFamily, Class, MessageBuilder, Method, TransactionId};
use rampart_xdp::monotonic_now_ns;
use relay_common::{
    CHANNEL_COUNTERS_MAP, CLIENT_CHANNELS_MAP, ChannelCounters, ClientChannelKey,
    ClientChannelValue, Counter, Endpoint, PEER_CHANNELS_MAP, PIN_LAYOUT_VERSION, PeerChannelValue,
    STATS_MAP, Stat,
};
use serde_json::Value;

const TEST: &str = "xdp_restart";
/// Messages each way on each channel, before and after the SIGKILL.
const MEDIA: usize = 100;
/// Messages each way on each channel once the bindings have expired.
const AFTER_EXPIRY: usize = 20;
/// Messages each way on the new call through the restarted agent.
const AFTER_RESTART: usize = 50;
/// The rewritten expiry: this long after the rewrite.
const SHORT_EXPIRY: Duration = Duration::from_secs(1);
/// Waited past the rewritten expiry before sending again.
const EXPIRY_MARGIN: Duration = Duration::from_millis(200);
/// How long nothing must arrive, in each direction, after the expiry.
const SILENCE: Duration = Duration::from_secs(1);
/// Bounds the wait for the old program to be freed once the new one replaced it.
const PROGRAM_FREED_WAIT: Duration = Duration::from_secs(3);
const CHANNEL: u16 = 0x4000;

#[test]
fn pinned_program_forwards_after_sigkill_until_expiry_and_a_restart_leaves_no_orphans() {
    let Some(topology) =
        EdgeTopology::create(TEST, SenderChecksums::Complete).expect("build the topology")
    else {
        return;
    };
    // Declared after the topology, so dropped before it; the agents are dropped (killed)
    // inside `scenario`, before both.
    let bpffs = BpfFs::mount().expect("mount a bpffs of the test's own");
    let started = Instant::now();
    let mut summary = String::new();
    if let Err(problem) = scenario(&topology, &bpffs, &mut summary) {
        panic!(
            "{TEST}: {problem}\n----- what passed before -----\n{summary}{}",
            topology.diagnostics()
        );
    }
    eprintln!("{TEST}: passed in {:.1?}\n{summary}", started.elapsed());
}

/// The agent's configuration: listeners on the edge's external addresses, relays on its
/// internal ones, native XDP on both, pins on the test's bpffs, counters every second.
fn agent_config(topology: &EdgeTopology, pin_path: &Path) -> RampartConfig {
    let mut config = topology.agent_config("native").with_xdp_pin_path(pin_path);
    // The counters are an array of this many slots, which the test dumps with bpftool.
    if let Some(xdp) = &mut config.xdp {
        xdp.max_channels = Some(1024);
    }
    config
}

/// The pinned objects of the agent's map layout.
struct Pins {
    dir: PathBuf,
}

impl Pins {
    fn map(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn link(&self, interface: &str) -> PathBuf {
        self.dir.join(format!("link_{interface}"))
    }

    fn dump(&self, name: &str) -> Result<Vec<MapEntry>, String> {
        bpf::map_dump(&self.map(name)).map_err(|e| format!("{e:#}"))
    }

    /// The program's statistics, summed over CPUs: slot -> (packets, bytes).
    fn stats(&self) -> Result<BTreeMap<u32, (u64, u64)>, String> {
        Ok(self
            .dump(STATS_MAP)?
            .iter()
            .map(|e| {
                (
                    read_u32(&e.key, 0),
                    (
                        e.sum_u64(offset_of!(Counter, packets)),
                        e.sum_u64(offset_of!(Counter, bytes)),
                    ),
                )
            })
            .collect())
    }

    /// Every channel's counters, summed over CPUs, by counter id.
    fn channel_counters(&self) -> Result<BTreeMap<u32, ChannelCounters>, String> {
        Ok(self
            .dump(CHANNEL_COUNTERS_MAP)?
            .iter()
            .map(|e| {
                (
                    read_u32(&e.key, 0),
                    ChannelCounters {
                        to_peer_packets: e.sum_u64(offset_of!(ChannelCounters, to_peer_packets)),
                        to_peer_bytes: e.sum_u64(offset_of!(ChannelCounters, to_peer_bytes)),
                        to_client_packets: e
                            .sum_u64(offset_of!(ChannelCounters, to_client_packets)),
                        to_client_bytes: e.sum_u64(offset_of!(ChannelCounters, to_client_bytes)),
                        ..ChannelCounters::default()
                    },
                )
            })
            .collect())
    }

    /// The counter id of the channel whose client-direction key names `client`.
    fn counter_id_of(&self, client: SocketAddr) -> Result<u32, String> {
        let endpoint = endpoint_bytes(client);
        let start = offset_of!(ClientChannelKey, client);
        let entries = self.dump(CLIENT_CHANNELS_MAP)?;
        let entry = entries
            .iter()
            .find(|e| e.key[start..start + endpoint.len()] == endpoint[..])
            .ok_or_else(|| {
                format!(
                    "no entry for client {client} in {CLIENT_CHANNELS_MAP} ({} entries)",
                    entries.len()
                )
            })?;
        Ok(read_u32(
            entry.value(),
            offset_of!(ClientChannelValue, counter_id),
        ))
    }

    /// Entries of the channel maps, and counter slots that are not zero (the counters are an
    /// array: a slot is zeroed when its channel is removed): (client, peer, counters).
    fn channel_entries(&self) -> Result<(usize, usize, usize), String> {
        Ok((
            self.dump(CLIENT_CHANNELS_MAP)?.len(),
            self.dump(PEER_CHANNELS_MAP)?.len(),
            self.dump(CHANNEL_COUNTERS_MAP)?
                .iter()
                .filter(|e| e.values.iter().any(|v| v.iter().any(|&b| b != 0)))
                .count(),
        ))
    }
}

/// An [`Endpoint`]'s bytes as the maps hold them.
fn endpoint_bytes(addr: SocketAddr) -> Vec<u8> {
    let e = Endpoint::from(addr);
    let mut bytes = e.ip.to_vec();
    bytes.extend_from_slice(&e.port.to_ne_bytes());
    bytes.extend_from_slice(&e._pad);
    assert_eq!(bytes.len(), size_of::<Endpoint>());
    bytes
}

/// A client with an allocation and one channel to a peer of its own family.
struct Call {
    name: &'static str,
    v6: bool,
    client: TurnClient,
    channel: Channel,
}

fn open_call(topology: &EdgeTopology, agent: &Rampart, v6: bool) -> Result<Call, String> {
    let name = if v6 { "IPv6 call" } else { "IPv4 call" };
    let err = |what: &str, e: anyhow::Error| format!("{name}: {what}: {e:#}");
    let listener = agent.addr(Proto::Udp, topology.edge_external_ip(v6));
    let client_ip = topology.client_ip(v6);
    let mut client = run_in(topology.client.name(), || {
        TurnClient::connect_udp(client_ip, listener)
    })
    .map_err(|e| err("client socket", e))?;
    let family = if v6 {
        AddressFamily::V6
    } else {
        AddressFamily::V4
    };
    let allocated = client
        .allocate(USER, PASSWORD, family)
        .map_err(|e| err("Allocate", e))?;
    let relayed = *allocated
        .relayed
        .iter()
        .find(|a| a.is_ipv6() == v6)
        .ok_or_else(|| format!("{name}: no relayed address of the family in {allocated:?}"))?;
    if relayed.ip() != topology.edge_internal_ip(v6) {
        return Err(format!(
            "{name}: relayed address {relayed} is not on the edge's internal interface"
        ));
    }
    let peer_ip = topology.peer_ip(v6);
    let peer = run_in(topology.peer.name(), || UdpSocket::bind((peer_ip, 0)))
        .map_err(|e| format!("{name}: peer socket on {peer_ip}: {e}"))?;
    let peer_addr = peer.local_addr().expect("bound");
    client
        .create_permission(&[peer_addr])
        .map_err(|e| err("CreatePermission", e))?;
    client
        .channel_bind(CHANNEL, peer_addr)
        .map_err(|e| err("ChannelBind", e))?;
    Ok(Call {
        name,
        v6,
        client,
        channel: Channel {
            number: CHANNEL,
            peer,
            relayed,
        },
    })
}

/// `count` messages each way on the call's channel, all of which must arrive; accounted in
/// `expect`. `tag` makes them distinct from other phases'.
fn media(call: &mut Call, tag: u8, count: usize, expect: &mut Expect) -> Result<(), String> {
    let outbound = messages(tag, count);
    let inbound = messages(tag ^ 0x80, count);
    client_to_peer(&mut call.client, &call.channel, &outbound)
        .map_err(|e| format!("{}: {e}", call.name))?;
    peer_to_client(&mut call.client, &call.channel, &inbound)
        .map_err(|e| format!("{}: {e}", call.name))?;
    expect.record(call.v6, &call.channel, &outbound, &inbound);
    Ok(())
}

/// Media on every call, checked against the agent's counters: all of it went through XDP,
/// none through userspace. `before`: a `counters` line awaited after the calls were set up
/// (one is logged only when something changed, so it is awaited where something did).
/// Returns the account.
fn media_through_xdp(
    agent: &Rampart,
    before: &Value,
    calls: &mut [Call],
    tag: u8,
    count: usize,
) -> Result<String, String> {
    let mut expect = Expect::default();
    for (k, call) in calls.iter_mut().enumerate() {
        media(
            call,
            tag + u8::try_from(k).expect("few calls"),
            count,
            &mut expect,
        )?;
    }
    let after = next_counters(agent)?;
    let userspace = userspace_delta(before, &after);
    let moved = xdp_delta(before, &after);
    let kernel = kernel_flow(&moved);
    let frames = expect.frames();
    let account = format!(
        "{count} message(s) each way on {} channel(s): XDP {kernel}; userspace relay {userspace}",
        calls.len()
    );
    if userspace != Flow::default() {
        return Err(format!(
            "userspace relayed media the kernel should have forwarded: {account}; XDP slots \
             that moved: {moved:?}"
        ));
    }
    if kernel != frames {
        return Err(format!(
            "the XDP counters do not account for the media (expected {frames}): {account}; XDP \
             slots that moved: {moved:?}"
        ));
    }
    Ok(account)
}

fn scenario(topology: &EdgeTopology, bpffs: &BpfFs, summary: &mut String) -> Result<(), String> {
    let pins = Pins {
        dir: bpffs.path().join(PIN_LAYOUT_VERSION),
    };
    let config = agent_config(topology, bpffs.path());

    // ---- 1. Calls through a running agent go through XDP.
    let mut agent = Rampart::start(&config).map_err(|e| format!("start the agent: {e:#}"))?;
    let log = strip_ansi(&agent.log());
    for interface in [EDGE_EXT_IF, EDGE_INT_IF] {
        if !log.lines().any(|l| {
            l.contains("XDP fast path attached")
                && l.contains(&format!("\"{interface}\""))
                && l.contains("\"native\"")
        }) {
            return Err(format!(
                "no native XDP attachment to {interface} in the first agent's log"
            ));
        }
    }
    let mut calls = vec![
        open_call(topology, &agent, false)?,
        open_call(topology, &agent, true)?,
    ];
    let before = next_counters(&agent)?;
    let installed = number(&before, &["fast_path", "channels_installed"]);
    if installed != calls.len() as u64 {
        return Err(format!(
            "fast_path.channels_installed is {installed} with {} channels bound",
            calls.len()
        ));
    }
    // Counter slots start at zero and count once media flows.
    let (client_entries, peer_entries, counter_entries) = pins.channel_entries()?;
    if (client_entries, peer_entries, counter_entries) != (calls.len(), calls.len(), 0) {
        return Err(format!(
            "pinned maps hold {client_entries} client, {peer_entries} peer and \
             {counter_entries} non-zero counter entries for {} fresh channels",
            calls.len()
        ));
    }
    let account = media_through_xdp(&agent, &before, &mut calls, 0x10, MEDIA)?;
    let counting = pins.channel_entries()?.2;
    if counting != calls.len() {
        return Err(format!(
            "{counting} counter slots count after media on {} channels",
            calls.len()
        ));
    }
    let _ = writeln!(summary, "  ok  running agent: {account}");
    let link_before = link_ids(&pins, EDGE_EXT_IF)?;

    // ---- 2. SIGKILL: the pinned program keeps forwarding.
    let pid = agent.pid();
    let status = agent
        .sigkill()
        .map_err(|e| format!("SIGKILL the agent (pid {pid}): {e}"))?;
    if status.signal() != Some(nix::libc::SIGKILL) {
        return Err(format!("the agent ended with {status}, not by SIGKILL"));
    }
    if Path::new(&format!("/proc/{pid}")).exists() {
        return Err(format!("process {pid} still exists after SIGKILL and wait"));
    }
    let listener = agent.addr(Proto::Udp, topology.edge_external_ip(false));
    let answer = binding_probe(topology, listener);
    if let Some(answer) = &answer {
        return Err(format!(
            "something still answers STUN at the dead agent's {listener}: {answer}"
        ));
    }
    let _ = writeln!(
        summary,
        "  ok  SIGKILL: pid {pid} ended by signal 9 and was reaped; a Binding to {listener} gets \
         no answer"
    );

    let stats_before = pins.stats()?;
    let counters_before = pins.channel_counters()?;
    let mut per_call = Vec::new();
    for (k, call) in calls.iter_mut().enumerate() {
        let mut one = Expect::default();
        media(
            call,
            0x20 + u8::try_from(k).expect("few calls"),
            MEDIA,
            &mut one,
        )
        .map_err(|e| format!("after SIGKILL (only the kernel can relay now): {e}"))?;
        per_call.push(one);
    }
    let stats_after = pins.stats()?;
    let counters_after = pins.channel_counters()?;
    for (call, one) in calls.iter().zip(&per_call) {
        let id = pins.counter_id_of(call.client.local_addr())?;
        let zero = ChannelCounters::default();
        let before = counters_before.get(&id).copied().unwrap_or(zero);
        let after = counters_after.get(&id).copied().ok_or_else(|| {
            format!(
                "{}: counter id {id} is missing from {CHANNEL_COUNTERS_MAP}",
                call.name
            )
        })?;
        let moved = Flow {
            to_peer: Count {
                packets: after.to_peer_packets - before.to_peer_packets,
                bytes: after.to_peer_bytes - before.to_peer_bytes,
            },
            to_client: Count {
                packets: after.to_client_packets - before.to_client_packets,
                bytes: after.to_client_bytes - before.to_client_bytes,
            },
        };
        if moved != one.data() {
            return Err(format!(
                "{}: the pinned channel counters (id {id}) moved {moved}, expected {} for the \
                 media after SIGKILL",
                call.name,
                one.data()
            ));
        }
        let _ = writeln!(
            summary,
            "  ok  after SIGKILL, {}: {MEDIA} message(s) each way arrived; pinned \
             {CHANNEL_COUNTERS_MAP}[{id}] moved {moved}",
            call.name
        );
    }
    let frames = per_call
        .iter()
        .fold(Flow::default(), |sum, one| sum + one.frames());
    let stat_delta = |stat: Stat| {
        let (p1, b1) = stats_after.get(&stat.index()).copied().unwrap_or_default();
        let (p0, b0) = stats_before.get(&stat.index()).copied().unwrap_or_default();
        Count {
            packets: p1 - p0,
            bytes: b1 - b0,
        }
    };
    let forwarded = Flow {
        to_peer: stat_delta(Stat::ForwardedToPeer),
        to_client: stat_delta(Stat::ForwardedToClient),
    };
    if forwarded != frames {
        return Err(format!(
            "the pinned {STATS_MAP} moved {forwarded}, expected {frames} for the media after \
             SIGKILL"
        ));
    }
    let _ = writeln!(
        summary,
        "  ok  after SIGKILL: pinned {STATS_MAP} forwarded {forwarded} (seen: {} frames)",
        Stat::ALL
            .iter()
            .filter(|&&stat| stat != Stat::Seen)
            .map(|&stat| stat_delta(stat).packets)
            .sum::<u64>()
    );

    // ---- 3. Expiry: rewrite every entry's expires_ns to 1 s from now; then nothing passes.
    let now_ns = monotonic_now_ns();
    let recorded = shorten_expiry(&pins, now_ns + nanos(SHORT_EXPIRY))?;
    let _ = writeln!(
        summary,
        "  ok  recorded expiries were {recorded} from now; rewrote expires_ns (offset {} in \
         {CLIENT_CHANNELS_MAP}, {} in {PEER_CHANNELS_MAP}) to now + {SHORT_EXPIRY:?}",
        offset_of!(ClientChannelValue, expires_ns),
        offset_of!(PeerChannelValue, expires_ns)
    );
    // Sleep past it: bounded by SHORT_EXPIRY + EXPIRY_MARGIN.
    let wake_ns = now_ns + nanos(SHORT_EXPIRY + EXPIRY_MARGIN);
    std::thread::sleep(Duration::from_nanos(
        wake_ns.saturating_sub(monotonic_now_ns()),
    ));
    let stats_before = pins.stats()?;
    let counters_before = pins.channel_counters()?;
    let to_clients = silent_peer_to_client(&mut calls, AFTER_EXPIRY)?;
    let to_peers = silent_client_to_peer(&mut calls, AFTER_EXPIRY)?;
    let stats_after = pins.stats()?;
    let counters_after = pins.channel_counters()?;
    let stat_delta = |stat: Stat| {
        let (p1, _) = stats_after.get(&stat.index()).copied().unwrap_or_default();
        let (p0, _) = stats_before.get(&stat.index()).copied().unwrap_or_default();
        p1 - p0
    };
    let sent = (to_clients + to_peers) as u64;
    let expired = stat_delta(Stat::PassExpired);
    let forwarded = stat_delta(Stat::ForwardedToPeer) + stat_delta(Stat::ForwardedToClient);
    if expired != sent || forwarded != 0 || counters_after != counters_before {
        return Err(format!(
            "after the expiry, {sent} datagram(s) sent: pass_expired moved {expired} (expected \
             all of them), forwarded_to_* moved {forwarded} (expected 0); channel counters \
             {counters_before:?} -> {counters_after:?}"
        ));
    }
    let (client_entries, peer_entries, _) = pins.channel_entries()?;
    let _ = writeln!(
        summary,
        "  ok  after the expiry: none of {to_clients} peer->client and {to_peers} \
         client->peer datagram(s) arrived within {SILENCE:?} each; pass_expired moved \
         {expired}; the kernel left the {client_entries}+{peer_entries} expired entries in \
         place"
    );

    // ---- 4. A restarted agent takes over and reconciles: no orphans.
    drop(calls);
    drop(agent);
    let agent = Rampart::start(&config).map_err(|e| format!("restart the agent: {e:#}"))?;
    let log = strip_ansi(&agent.log());
    for interface in [EDGE_EXT_IF, EDGE_INT_IF] {
        if !log.lines().any(|l| {
            l.contains("took over the pinned link of a previous agent")
                && l.contains(&format!("\"{interface}\""))
        }) {
            return Err(format!(
                "the restarted agent's log does not say it took over the pinned link of \
                 {interface}"
            ));
        }
    }
    let expected_removed = format!("removed={}", client_entries);
    let reconciled = log
        .lines()
        .find(|l| l.contains("XDP maps reconciled"))
        .ok_or("the restarted agent's log has no \"XDP maps reconciled\" line")?;
    if !reconciled.contains("adopted=0") || !reconciled.contains(&expected_removed) {
        return Err(format!(
            "expected adopted=0 {expected_removed} in the reconciliation line: {reconciled}"
        ));
    }
    let counters = next_counters(&agent)?;
    let adopted = number(&counters, &["fast_path", "channels_adopted"]);
    let stale = number(&counters, &["fast_path", "stale_removed"]);
    if adopted != 0 || stale != client_entries as u64 {
        return Err(format!(
            "fast_path.channels_adopted = {adopted}, stale_removed = {stale}; expected 0 and \
             {client_entries}"
        ));
    }
    let left = pins.channel_entries()?;
    if left != (0, 0, 0) {
        return Err(format!(
            "orphans after the restart: {CLIENT_CHANNELS_MAP}, {PEER_CHANNELS_MAP}, \
             {CHANNEL_COUNTERS_MAP} hold {left:?} entries"
        ));
    }
    let _ = writeln!(
        summary,
        "  ok  restart: took over the pinned links of {EDGE_EXT_IF} and {EDGE_INT_IF}; \
         reconciled adopted={adopted} removed={stale}; channel, peer and counter maps hold 0 \
         entries"
    );
    let link_after = link_ids(&pins, EDGE_EXT_IF)?;
    if link_after.link != link_before.link || link_after.program == link_before.program {
        return Err(format!(
            "the pinned link of {EDGE_EXT_IF} was {link_before:?} and is {link_after:?}: \
             expected the same link with a new program"
        ));
    }
    for interface in [EDGE_EXT_IF, EDGE_INT_IF] {
        let ids = link_ids(&pins, interface)?;
        let attached = attached_xdp(topology, interface)?;
        if attached != Some((XDP_ATTACHED_DRV, ids.program)) {
            return Err(format!(
                "{interface} has XDP {attached:?} (mode, program id); expected native mode with \
                 the restarted agent's program {}",
                ids.program
            ));
        }
    }
    wait_program_freed(link_before.program)?;
    let _ = writeln!(
        summary,
        "  ok  link {} on {EDGE_EXT_IF} kept; its program went from id {} (now freed) to {}, \
         attached in native mode to {EDGE_EXT_IF} and {EDGE_INT_IF}",
        link_after.link, link_before.program, link_after.program
    );

    let mut calls = vec![open_call(topology, &agent, false)?];
    let before = next_counters(&agent)?;
    let account = media_through_xdp(&agent, &before, &mut calls, 0x30, AFTER_RESTART)?;
    let entries = pins.channel_entries()?;
    if entries != (1, 1, 1) {
        return Err(format!(
            "after a new channel through the restarted agent the maps hold {entries:?} \
             entries, expected one each"
        ));
    }
    let _ = writeln!(
        summary,
        "  ok  new call through the restarted agent: {account}"
    );
    Ok(())
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).expect("a short duration")
}

/// Rewrites `expires_ns` of every entry of both channel maps to `expires_ns`; returns how far
/// in the future the recorded expiries were (for the report).
fn shorten_expiry(pins: &Pins, expires_ns: u64) -> Result<String, String> {
    let now = monotonic_now_ns();
    let mut recorded = Vec::new();
    for (map, offset) in [
        (
            CLIENT_CHANNELS_MAP,
            offset_of!(ClientChannelValue, expires_ns),
        ),
        (PEER_CHANNELS_MAP, offset_of!(PeerChannelValue, expires_ns)),
    ] {
        let entries = pins.dump(map)?;
        if entries.is_empty() {
            return Err(format!("{map} is empty before the expiry rewrite"));
        }
        for entry in entries {
            let mut value = entry.value().to_vec();
            let old = read_u64(&value, offset);
            if old <= now {
                return Err(format!(
                    "an entry of {map} had expired already ({old} <= now {now})"
                ));
            }
            recorded.push(Duration::from_nanos(old - now));
            value[offset..offset + 8].copy_from_slice(&expires_ns.to_ne_bytes());
            bpf::map_update(&pins.map(map), &entry.key, &value).map_err(|e| format!("{e:#}"))?;
        }
        for entry in pins.dump(map)? {
            let written = read_u64(entry.value(), offset);
            if written != expires_ns {
                return Err(format!(
                    "{map} still holds expires_ns {written} after the rewrite to {expires_ns}"
                ));
            }
        }
    }
    let secs: Vec<String> = recorded
        .iter()
        .map(|d| format!("{:.0}s", d.as_secs_f64()))
        .collect();
    Ok(secs.join(", "))
}

/// Peer -> client after the expiry: `count` datagrams from every call's peer; none may reach
/// its client within [`SILENCE`]. Returns how many were sent.
fn silent_peer_to_client(calls: &mut [Call], count: usize) -> Result<usize, String> {
    let mut sent = 0;
    for (k, call) in calls.iter().enumerate() {
        for m in messages(0x40 + u8::try_from(k).expect("few calls"), count) {
            call.channel
                .peer
                .send_to(&m, call.channel.relayed)
                .map_err(|e| format!("{}: peer send: {e}", call.name))?;
            sent += 1;
        }
    }
    let deadline = Instant::now() + SILENCE;
    for call in calls.iter_mut() {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left < Duration::from_millis(1) {
                break;
            }
            match call.client.recv(left) {
                Ok(None) => break,
                Ok(Some(Received::Channel { channel, data })) => {
                    return Err(format!(
                        "{}: {} byte(s) on channel {channel:#06x} reached the client after the \
                         binding expired",
                        call.name,
                        data.len()
                    ));
                }
                Ok(Some(other)) => {
                    return Err(format!(
                        "{}: {other:?} reached the client after the binding expired",
                        call.name
                    ));
                }
                // A port unreachable from the edge (an earlier datagram to the dead agent's
                // port): not data.
                Err(e) if is_refused(&e) => {}
                Err(e) => return Err(format!("{}: client receive: {e:#}", call.name)),
            }
        }
    }
    Ok(sent)
}

/// Client -> peer after the expiry: `count` ChannelData messages from every call's client;
/// none may reach its peer within [`SILENCE`]. Returns how many were sent.
fn silent_client_to_peer(calls: &mut [Call], count: usize) -> Result<usize, String> {
    let mut sent = 0;
    for (k, call) in calls.iter_mut().enumerate() {
        for m in messages(0x50 + u8::try_from(k).expect("few calls"), count) {
            match call.client.send_channel_data(call.channel.number, &m) {
                Ok(()) => sent += 1,
                // The edge's stack answers ChannelData to the dead agent's port with port
                // unreachable, which a connected UDP socket reports on a later call: this
                // datagram was not sent; send it once more.
                Err(e) if is_refused(&e) => {
                    call.client
                        .send_channel_data(call.channel.number, &m)
                        .map_err(|e| format!("{}: client send: {e:#}", call.name))?;
                    sent += 1;
                }
                Err(e) => return Err(format!("{}: client send: {e:#}", call.name)),
            }
        }
    }
    let deadline = Instant::now() + SILENCE;
    let mut buf = vec![0u8; 2048];
    for call in calls.iter() {
        // Everything was sent before the deadline was set: what has not arrived by then
        // for the first peer has had as long for the others. At least a millisecond each
        // (a zero read timeout means none).
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        let peer = &call.channel.peer;
        peer.set_read_timeout(Some(left))
            .map_err(|e| format!("{}: {e}", call.name))?;
        match peer.recv_from(&mut buf) {
            Ok((n, from)) => {
                return Err(format!(
                    "{}: {n} byte(s) from {from} reached the peer after the binding expired",
                    call.name
                ));
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(format!("{}: peer receive: {e}", call.name)),
        }
    }
    Ok(sent)
}

fn is_refused(e: &anyhow::Error) -> bool {
    e.downcast_ref::<io::Error>()
        .is_some_and(|e| e.kind() == io::ErrorKind::ConnectionRefused)
}

/// A STUN Binding from the client's namespace to `listener`; the answer, if one comes within
/// 300 ms.
fn binding_probe(topology: &EdgeTopology, listener: SocketAddr) -> Option<String> {
    let client_ip = topology.client_ip(listener.is_ipv6());
    run_in(topology.client.name(), || {
        let socket = UdpSocket::bind((client_ip, 0)).ok()?;
        socket.connect(listener).ok()?;
        socket
            .set_read_timeout(Some(Duration::from_millis(300)))
            .ok()?;
        let request = MessageBuilder::new(
            Class::Request,
            Method::BINDING,
            TransactionId(*b"xdp-restart!"),
        )
        .finish();
        socket.send(&request).ok()?;
        let mut buf = [0u8; 1500];
        // Refused (port unreachable) or a timeout: nobody answered.
        let n = socket.recv(&mut buf).ok()?;
        Some(format!("{n} byte(s): {:02x?}", &buf[..n.min(20)]))
    })
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct LinkIds {
    link: u64,
    program: u64,
}

/// The pinned XDP link of `interface` and the program in it.
fn link_ids(pins: &Pins, interface: &str) -> Result<LinkIds, String> {
    let path = pins.link(interface);
    let link = bpf::link_show(&path).map_err(|e| format!("{e:#}"))?;
    let id = |key: &str| {
        link[key].as_u64().ok_or_else(|| {
            format!(
                "`bpftool link show pinned {}`: no {key} in {link}",
                path.display()
            )
        })
    };
    Ok(LinkIds {
        link: id("id")?,
        program: id("prog_id")?,
    })
}

/// `XDP_ATTACHED_DRV` (include/uapi/linux/if_link.h): native mode.
const XDP_ATTACHED_DRV: u64 = 1;

/// The XDP attachment of `interface` in the edge namespace as `ip -j link show` reports it:
/// (mode, program id), or None when nothing is attached.
fn attached_xdp(topology: &EdgeTopology, interface: &str) -> Result<Option<(u64, u64)>, String> {
    let out = std::process::Command::new("ip")
        .args([
            "-j",
            "-d",
            "-n",
            topology.edge.name(),
            "link",
            "show",
            "dev",
            interface,
        ])
        .output()
        .map_err(|e| format!("ip link show: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let links: Value = serde_json::from_str(&text)
        .map_err(|e| format!("`ip -j link show dev {interface}` printed {text:?}: {e}"))?;
    let xdp = &links[0]["xdp"];
    if xdp.is_null() {
        return Ok(None);
    }
    match (xdp["mode"].as_u64(), xdp["prog"]["id"].as_u64()) {
        (Some(mode), Some(id)) => Ok(Some((mode, id))),
        _ => Err(format!("unexpected XDP attachment of {interface}: {xdp}")),
    }
}

/// Waits (bounded) until program `id` is gone from the kernel: nothing holds the replaced
/// program any more.
fn wait_program_freed(id: u64) -> Result<(), String> {
    let bpftool = rampart_tests::tools::require("bpftool", "bpftool (the Debian package)");
    let deadline = Instant::now() + PROGRAM_FREED_WAIT;
    loop {
        let out = std::process::Command::new(&bpftool)
            .args(["prog", "show", "id", &id.to_string()])
            .output()
            .map_err(|e| format!("bpftool prog show: {e}"))?;
        if !out.status.success() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "the replaced program {id} is still loaded {PROGRAM_FREED_WAIT:?} after the \
                 restart: {}",
                String::from_utf8_lossy(&out.stdout)
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The log without ANSI colour sequences (`ESC [ ... m`), so field values can be matched.
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}
