//! The program's maps (types and names in `relay-common`) and the counting helpers.

use aya_ebpf::{
    bindings::bpf_fib_lookup,
    macros::map,
    maps::{Array, DevMapHash, HashMap, PerCpuArray},
};
use relay_common::{
    ChannelCounters, ClientChannelKey, ClientChannelValue, Counter, DEFAULT_MAX_CHANNELS,
    DEFAULT_MAX_EGRESS, PeerChannelKey, PeerChannelValue, STATS_LEN, Settings, Stat,
};

#[map(name = "RAMPART_STATS")]
pub static STATS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(STATS_LEN, 0);

#[map(name = "RAMPART_CLIENT_CHANNELS")]
pub static CLIENT_CHANNELS: HashMap<ClientChannelKey, ClientChannelValue> =
    HashMap::with_max_entries(DEFAULT_MAX_CHANNELS, 0);

#[map(name = "RAMPART_PEER_CHANNELS")]
pub static PEER_CHANNELS: HashMap<PeerChannelKey, PeerChannelValue> =
    HashMap::with_max_entries(DEFAULT_MAX_CHANNELS, 0);

#[map(name = "RAMPART_CHANNEL_COUNTERS")]
pub static CHANNEL_COUNTERS: PerCpuArray<ChannelCounters> =
    PerCpuArray::with_max_entries(DEFAULT_MAX_CHANNELS, 0);

#[map(name = "RAMPART_EGRESS")]
pub static EGRESS: DevMapHash = DevMapHash::with_max_entries(DEFAULT_MAX_EGRESS, 0);

#[map(name = "RAMPART_SETTINGS")]
pub static SETTINGS: Array<Settings> = Array::with_max_entries(1, 0);

/// Per-CPU scratch memory for the large structures of one run: the map keys and the FIB
/// lookup parameters. On the 512-byte BPF stack they would not fit beside everything else.
/// Private to the program (the agent never touches it).
#[repr(C)]
pub struct Scratch {
    pub client_key: ClientChannelKey,
    pub peer_key: PeerChannelKey,
    pub fib: bpf_fib_lookup,
}

#[map(name = "RAMPART_SCRATCH")]
pub static SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

/// This CPU's scratch memory. An XDP program runs to completion on its CPU, so nothing else
/// uses it meanwhile.
#[inline(always)]
pub fn scratch() -> Option<&'static mut Scratch> {
    // SAFETY: index 0 exists; per-CPU and not preempted, so the reference is exclusive.
    SCRATCH.get_ptr_mut(0).map(|ptr| unsafe { &mut *ptr })
}

#[inline(always)]
pub fn count(stat: Stat, bytes: usize) {
    if let Some(counter) = STATS.get_ptr_mut(stat.index()) {
        // SAFETY: the slot belongs to this CPU, and an XDP program is not preempted on it, so
        // nothing else writes it concurrently.
        unsafe {
            (*counter).packets += 1;
            (*counter).bytes += bytes as u64;
        }
    }
}

/// Which way a channel's payload went.
#[derive(Clone, Copy)]
pub enum Direction {
    ToPeer,
    ToClient,
}

/// Adds one datagram of `payload` bytes to the channel's counters (an index the agent
/// assigned; one out of range counts nothing).
#[inline(always)]
pub fn count_channel(counter_id: u32, direction: Direction, payload: usize) {
    if let Some(counters) = CHANNEL_COUNTERS.get_ptr_mut(counter_id) {
        // SAFETY: a per-CPU value, as in `count`.
        unsafe {
            match direction {
                Direction::ToPeer => {
                    (*counters).to_peer_packets += 1;
                    (*counters).to_peer_bytes += payload as u64;
                }
                Direction::ToClient => {
                    (*counters).to_client_packets += 1;
                    (*counters).to_client_bytes += payload as u64;
                }
            }
        }
    }
}
