//! Rampart's XDP program.
//!
//! For now it only counts the frames it sees in [`RAMPART_STATS`] and hands every one of them
//! to the kernel stack (`XDP_PASS`), where the userspace relay picks them up. The TURN
//! ChannelData fast path will be added here; anything the program does not own keeps going to
//! userspace.
//!
//! This crate is built for `bpfel-unknown-none` by `relay-user`'s build script (aya-build). On
//! the host it still compiles (as an empty binary), so that `cargo clippy --workspace` lints the
//! program's code too.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

use aya_ebpf::{
    bindings::xdp_action, macros::map, macros::xdp, maps::PerCpuArray, programs::XdpContext,
};
use relay_common::{Counter, STATS_LEN, Stat};

#[map(name = "RAMPART_STATS")]
static RAMPART_STATS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(STATS_LEN, 0);

#[xdp]
pub fn rampart_xdp(ctx: XdpContext) -> u32 {
    count(Stat::Seen, ctx.data_end() - ctx.data());
    xdp_action::XDP_PASS
}

#[inline(always)]
fn count(stat: Stat, bytes: usize) {
    if let Some(counter) = RAMPART_STATS.get_ptr_mut(stat.index()) {
        // SAFETY: the slot belongs to this CPU, and an XDP program is not preempted on it, so
        // nothing else writes it concurrently.
        unsafe {
            (*counter).packets += 1;
            (*counter).bytes += bytes as u64;
        }
    }
}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any reachable panic path, so this is never run.
    loop {}
}

/// The kernel only lets GPL-compatible programs call the GPL-only helpers.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

#[cfg(not(target_arch = "bpf"))]
fn main() {
    eprintln!(
        "relay-ebpf is an XDP program: relay-user's build script builds it for bpfel-unknown-none \
         and embeds it in the agent; this host binary does nothing"
    );
}
