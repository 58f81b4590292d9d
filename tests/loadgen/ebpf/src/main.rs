//! The load generator's XDP programs (see `loadgen-common` for what each does and the maps).
//!
//! Built for `bpfel-unknown-none` by `rampart-loadgen`'s build script (aya-build, as
//! `relay-ebpf` is); on the host it compiles as an empty binary so that clippy lints it.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
#![cfg_attr(not(target_arch = "bpf"), allow(dead_code))]

mod frame;

use aya_ebpf::{
    bindings::xdp_action,
    helpers::generated::bpf_ktime_get_ns,
    macros::{map, xdp},
    maps::{Array, DevMap, DevMapHash, PerCpuArray},
    programs::XdpContext,
};
use loadgen_common::{
    CountConfig, FlowStats, InjectConfig, InjectFlow, InjectState, LATENCY_BUCKETS, MAX_FLOWS,
    latency_bucket, next_send,
};

use crate::frame::{Stamp, find_stamp, write_frame};

#[map(name = "LOADGEN_INJECT_CONFIG")]
static INJECT_CONFIG: Array<InjectConfig> = Array::with_max_entries(1, 0);

#[map(name = "LOADGEN_INJECT_FLOWS")]
static INJECT_FLOWS: Array<InjectFlow> = Array::with_max_entries(MAX_FLOWS * 2, 0);

#[map(name = "LOADGEN_INJECT_EGRESS")]
static INJECT_EGRESS: DevMap = DevMap::with_max_entries(2, 0);

#[map(name = "LOADGEN_INJECT_STATE")]
static INJECT_STATE: Array<InjectState> = Array::with_max_entries(1, 0);

#[map(name = "LOADGEN_REFLECT_EGRESS")]
static REFLECT_EGRESS: DevMapHash = DevMapHash::with_max_entries(2, 0);

#[map(name = "LOADGEN_COUNT_CONFIG")]
static COUNT_CONFIG: Array<CountConfig> = Array::with_max_entries(1, 0);

#[map(name = "LOADGEN_FLOW_STATS")]
static FLOW_STATS: Array<FlowStats> = Array::with_max_entries(MAX_FLOWS * 2, 0);

#[map(name = "LOADGEN_LATENCY")]
static LATENCY: PerCpuArray<u64> = PerCpuArray::with_max_entries(LATENCY_BUCKETS, 0);

/// Run by `BPF_PROG_RUN` in live-frames mode, in one long call per step, by one thread for
/// both directions (two spinning threads on one CPU would take turns in scheduler slices of
/// milliseconds, and each fall behind for a whole slice): the frame is the template (pages are recycled without it being copied again, and the relay rewrote the
/// headers of the last frame that used this page), so every field but the payload after the
/// stamp is written on every run. Runs before the next frame is due drop their page unsent:
/// the pacing is per frame, in the kernel, because a call's set-up and tear-down take
/// milliseconds and the edge's receive ring holds 256 frames.
#[xdp]
pub fn loadgen_inject(ctx: XdpContext) -> u32 {
    // One injecting thread per loaded object: nothing else writes these.
    let (Some(config), Some(state)) = (INJECT_CONFIG.get(0), INJECT_STATE.get_ptr_mut(0)) else {
        return xdp_action::XDP_ABORTED;
    };
    if config.flows == 0 {
        return xdp_action::XDP_ABORTED;
    }
    // SAFETY: no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    if config.interval_ns > 0 {
        // SAFETY: index 0 exists; the injecting thread is the only writer.
        let due = unsafe { (*state).next_ns };
        if now < due {
            return xdp_action::XDP_DROP;
        }
        // SAFETY: as above.
        unsafe { (*state).next_ns = next_send(due, now, config.interval_ns, config.burst) };
    }
    // SAFETY: as above.
    let n = unsafe { (*state).stamped };
    let direction = (n & 1) as u32;
    let k = n >> 1;
    let flows = u64::from(config.flows);
    let flow = (k % flows) as u32;
    let Some(addressing) = INJECT_FLOWS.get(flow * 2 + direction) else {
        return xdp_action::XDP_ABORTED;
    };
    let stamp = Stamp {
        step: config.step,
        flow,
        direction: direction as u8,
        seq: k / flows,
        sent_ns: now,
    };
    if write_frame(&ctx, config, addressing, &stamp).is_err() {
        return xdp_action::XDP_ABORTED;
    }
    // SAFETY: as above.
    unsafe { (*state).stamped = n + 1 };
    INJECT_EGRESS
        .redirect(direction, 0)
        .unwrap_or(xdp_action::XDP_ABORTED)
}

/// On the receiving hosts: counts the step's stamped frames and drops them; passes the rest.
#[xdp]
pub fn loadgen_count(ctx: XdpContext) -> u32 {
    let Some(stamp) = find_stamp(&ctx) else {
        return xdp_action::XDP_PASS;
    };
    let Some(config) = COUNT_CONFIG.get(0) else {
        return xdp_action::XDP_PASS;
    };
    if stamp.step != config.step || stamp.flow >= config.flows || stamp.direction > 1 {
        // A straggler of an earlier step, or a stranger: the stack drops it (no socket).
        return xdp_action::XDP_PASS;
    }
    let index = stamp.flow * 2 + u32::from(stamp.direction);
    if let Some(stats) = FLOW_STATS.get_ptr_mut(index) {
        // SAFETY: each flow and direction arrives on one receiving interface, whose NAPI runs
        // on one CPU at a time.
        unsafe { (*stats).record(stamp.seq) };
    }
    // SAFETY: no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let bucket = latency_bucket(now.saturating_sub(stamp.sent_ns));
    if let Some(count) = LATENCY.get_ptr_mut(bucket) {
        // SAFETY: this CPU's slot; XDP is not preempted.
        unsafe { *count += 1 };
    }
    xdp_action::XDP_DROP
}

/// The instrument's ceiling: in place of a relay on the edge, sends stamped frames on out of
/// the other edge interface, as a relay's fast path does (the counters go by the stamp, not
/// the addresses), with the MACs swapped and nothing else; passes the rest.
#[xdp]
pub fn loadgen_reflect(ctx: XdpContext) -> u32 {
    if find_stamp(&ctx).is_none() {
        return xdp_action::XDP_PASS;
    }
    if frame::swap_macs(&ctx).is_err() {
        return xdp_action::XDP_PASS;
    }
    REFLECT_EGRESS
        .redirect(ctx.ingress_ifindex() as u32, 0)
        .unwrap_or(xdp_action::XDP_ABORTED)
}

relay_common::ebpf_binary!(
    "loadgen-ebpf holds XDP programs: rampart-loadgen's build script builds them for \
     bpfel-unknown-none and embeds them; this host binary does nothing"
);
