//! The program's maps (types and names in `relay-common`), the counting helpers and the
//! bandwidth budgets.

use crate::error::Error;
use aya_ebpf::{
    bindings::bpf_fib_lookup,
    helpers::generated::bpf_ktime_get_coarse_ns,
    macros::map,
    maps::{Array, DevMapHash, HashMap, PerCpuArray},
};
use relay_common::{
    BUDGET_SLOTS, Budget, ChannelCounters, ClientChannelKey, ClientChannelValue, Counter,
    DEFAULT_MAX_CHANNELS, DEFAULT_MAX_EGRESS, Limit, PeerChannelKey, PeerChannelValue, STATS_LEN,
    Settings, Stat, TOTAL_TO_CLIENT, TOTAL_TO_PEER, TotalShare,
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

#[map(name = "RAMPART_TOTAL")]
pub static TOTAL: PerCpuArray<TotalShare> = PerCpuArray::with_max_entries(2, 0);

/// Whether the agent polices a total limit (`relay_common::TOTAL_ENABLED_GLOBAL`): read-only
/// data the agent sets at load time, so that the verifier prunes the total's code when it is 0.
#[unsafe(no_mangle)]
static RAMPART_TOTAL_ENABLED: u8 = 0;

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

/// Which way a channel's payload went. The discriminant indexes a budget's pair and the
/// total's map, as `relay_common` numbers them.
#[derive(Clone, Copy)]
pub enum Direction {
    ToPeer = TOTAL_TO_PEER as isize,
    ToClient = TOTAL_TO_CLIENT as isize,
}

/// Adds one datagram of `payload` bytes to the channel's counters (an index the agent
/// assigned; one out of range counts nothing): forwarded, or dropped over the limit.
#[inline(always)]
pub fn count_channel(counter_id: u32, direction: Direction, payload: usize, over_limit: bool) {
    if let Some(counters) = CHANNEL_COUNTERS.get_ptr_mut(counter_id) {
        // SAFETY: a per-CPU value, as in `count`.
        let counters = unsafe { &mut *counters };
        let (packets, bytes) = match (direction, over_limit) {
            (Direction::ToPeer, false) => {
                (&mut counters.to_peer_packets, &mut counters.to_peer_bytes)
            }
            (Direction::ToClient, false) => (
                &mut counters.to_client_packets,
                &mut counters.to_client_bytes,
            ),
            (Direction::ToPeer, true) => (
                &mut counters.to_peer_over_limit_packets,
                &mut counters.to_peer_over_limit_bytes,
            ),
            (Direction::ToClient, true) => (
                &mut counters.to_client_over_limit_packets,
                &mut counters.to_client_over_limit_bytes,
            ),
        };
        *packets += 1;
        *bytes += payload as u64;
    }
}

/// The buckets of limited allocations, two per slot (one per direction), in the program's
/// global data rather than a map: reaching a map value takes a helper call, across which the
/// compiler spills what is live, and the rewrites have no stack left for that. 2 MiB.
#[unsafe(no_mangle)]
static mut RAMPART_BUDGETS: [[Budget; 2]; BUDGET_SLOTS as usize] = [[Budget {
    generation: 0,
    _pad: 0,
    tat_ns: 0,
}; 2]; BUDGET_SLOTS as usize];

/// Polices `payload` bytes against the binding's limit in `direction`, charging them to the
/// allocation's bucket (`budget`: its slot and generation), then against this CPU's share of
/// the total when there is one: `Ok` without a limit (two compares) or within them,
/// `Err(OverLimit)` or `Err(OverTotal)` (counted on the channel) when a bucket is more than its
/// burst ahead of now, on the coarse clock (as for expiries; read only when something is
/// limited).
///
/// Charged before the rewrite, which may still pass the frame to userspace (MTU, no route):
/// userspace then charges it again in its own bucket, which sees no more than this one
/// admitted, so such frames are not cut below the limit either. Admitted bytes move the
/// bucket's arrival time on by their cost, after raising it to now if it was idle; that raise
/// can undo a concurrent charge only while the bucket is idle (under the limit), and another
/// CPU checking at the same moment lets at most one datagram more through.
#[inline(always)]
pub fn police(
    limit: &Limit,
    budget: (u32, u32),
    counter_id: u32,
    direction: Direction,
    payload: usize,
) -> Result<(), Error> {
    let total = total_enabled();
    if !limit.is_limited() && !total {
        return Ok(());
    }
    // SAFETY: no preconditions.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    if limit.is_limited() {
        police_allocation(limit, budget, counter_id, direction, payload, now)?;
    }
    if total {
        police_total(counter_id, direction, payload, now)?;
    }
    Ok(())
}

/// Whether [`police`] has anything to do for a binding limited by `limit`.
#[inline(always)]
pub fn polices(limit: &Limit) -> bool {
    limit.is_limited() || total_enabled()
}

#[inline(always)]
fn total_enabled() -> bool {
    // SAFETY: a global of the program's read-only data.
    unsafe { core::ptr::read_volatile(&raw const RAMPART_TOTAL_ENABLED) != 0 }
}

#[inline(always)]
fn police_allocation(
    limit: &Limit,
    (budget_id, generation): (u32, u32),
    counter_id: u32,
    direction: Direction,
    payload: usize,
    now: u64,
) -> Result<(), Error> {
    if budget_id >= BUDGET_SLOTS {
        return Ok(());
    }
    // SAFETY: in bounds; raw pointers only, since other CPUs write the bucket too (volatile
    // accesses and an atomic add).
    unsafe {
        let bucket = (&raw mut RAMPART_BUDGETS)
            .cast::<Budget>()
            .add(budget_id as usize * 2 + direction as usize);
        let tat = &raw mut (*bucket).tat_ns;
        let mut current = core::ptr::read_volatile(tat);
        if core::ptr::read_volatile(&raw const (*bucket).generation) != generation {
            // A new allocation in the slot: its bucket starts empty, whatever it admits now.
            core::ptr::write_volatile(&raw mut (*bucket).generation, generation);
            core::ptr::write_volatile(tat, 0);
            current = 0;
        }
        let Some(cost) = limit.admit(current, now, payload as u64) else {
            count_channel(counter_id, direction, payload, true);
            return Err(Error::OverLimit);
        };
        if current < now {
            core::ptr::write_volatile(tat, now);
        }
        add_to(tat, cost);
    }
    Ok(())
}

/// Adds `ns` (wrapping: a refund adds its negation) to a bucket's arrival time with the
/// `lock xadd` form, whose result is unused: the only atomic the BPF target offers without
/// cpu v3. CPUs charging the same allocation at once lose no charge.
#[inline(always)]
fn add_to(tat: *mut u64, ns: u64) {
    // SAFETY: an aligned u64 of the budgets, valid for the program's lifetime.
    unsafe {
        #[cfg(target_arch = "bpf")]
        core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(
            tat, ns,
        );
        // Only linted on the host, where the same add exists in std's form.
        #[cfg(not(target_arch = "bpf"))]
        core::sync::atomic::AtomicU64::from_ptr(tat)
            .fetch_add(ns, core::sync::atomic::Ordering::Relaxed);
    }
}

/// This CPU's share of the total limit: its own value, so plain stores (an XDP program is not
/// preempted on its CPU), and the offered bytes counted whatever the outcome, as the demand
/// the agent splits the total by.
#[inline(always)]
fn police_total(
    counter_id: u32,
    direction: Direction,
    payload: usize,
    now: u64,
) -> Result<(), Error> {
    let Some(share) = TOTAL.get_ptr_mut(direction as u32) else {
        return Ok(());
    };
    // SAFETY: this CPU's value, not written by anything else while the program runs here.
    let share = unsafe { &mut *share };
    share.offered_bytes = share.offered_bytes.wrapping_add(payload as u64);
    if !share.limit.is_limited() {
        return Ok(());
    }
    let Some(cost) = share.limit.admit(share.tat_ns, now, payload as u64) else {
        count_channel(counter_id, direction, payload, true);
        return Err(Error::OverTotal);
    };
    share.tat_ns = share.tat_ns.max(now) + cost;
    Ok(())
}
