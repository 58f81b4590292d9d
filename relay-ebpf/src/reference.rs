//! The benchmark's yardstick (`rampart_reference`): the least an XDP UDP forwarder does, kept
//! fixed so that `cargo xtask bench-xdp` can put Rampart's cost beside it in the same run.
//!
//! It parses Ethernet, IPv4 (no options) or IPv6 and the UDP header, swaps the MAC addresses
//! and redirects through the same devmap as the relay ([`EGRESS`]), keyed by the ingress
//! interface (a devmap lookup costs the same whatever the key; in `BPF_PROG_TEST_RUN` nothing
//! is transmitted). No other map, no helper, no checksum. Anything else is passed.
//!
//! Beside it, `rampart_reference_call` is the same with one helper call more
//! (`bpf_ktime_get_coarse_ns`, whose work is a few loads): the difference is what one call into
//! the kernel and back costs on the machine. That cost varies more between machines than
//! anything else the relay does: on CPUs with return-stack mitigations (AMD's SRSO "Safe
//! RET") every return is slowed, and the relay cannot do without a few calls (the binding's
//! hash lookup, the clock, resizing the frame, the redirect).
//!
//! The agent never loads them; only the benchmark does.

use aya_ebpf::{
    bindings::xdp_action, helpers::generated::bpf_ktime_get_coarse_ns, macros::xdp,
    programs::XdpContext,
};

use crate::{
    error::Error,
    maps::EGRESS,
    packet::{ETH_LEN, ETH_P_IPV4, ETH_P_IPV6, EthHdr, IPPROTO_UDP, UdpHdr, be16, ptr_at, ref_at},
};

#[xdp]
pub fn rampart_reference(ctx: XdpContext) -> u32 {
    reflect(&ctx).unwrap_or(xdp_action::XDP_PASS)
}

#[xdp]
pub fn rampart_reference_call(ctx: XdpContext) -> u32 {
    // SAFETY: no preconditions.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    // Never true (the clock started at boot), but the call's result is used, so it stays.
    if now == 0 {
        return xdp_action::XDP_ABORTED;
    }
    reflect(&ctx).unwrap_or(xdp_action::XDP_PASS)
}

#[inline(always)]
fn reflect(ctx: &XdpContext) -> Result<u32, Error> {
    let eth: &EthHdr = ref_at(ctx, 0, Error::Malformed)?;
    let udp_offset = match be16(eth.ether_type) {
        ETH_P_IPV4 => {
            let ip: &[u8; 20] = ref_at(ctx, ETH_LEN, Error::Malformed)?;
            if ip[0] != 0x45 || ip[9] != IPPROTO_UDP {
                return Err(Error::NotOurs);
            }
            ETH_LEN + 20
        }
        ETH_P_IPV6 => {
            let ip: &[u8; 40] = ref_at(ctx, ETH_LEN, Error::Malformed)?;
            if ip[0] >> 4 != 6 || ip[6] != IPPROTO_UDP {
                return Err(Error::NotOurs);
            }
            ETH_LEN + 40
        }
        _ => return Err(Error::NotOurs),
    };
    let _udp: &UdpHdr = ref_at(ctx, udp_offset, Error::Malformed)?;
    let eth: *mut EthHdr = ptr_at(ctx, 0).ok_or(Error::Malformed)?;
    // SAFETY: `ptr_at` checked that the Ethernet header lies inside the frame.
    unsafe { core::mem::swap(&mut (*eth).dst, &mut (*eth).src) };
    EGRESS
        .redirect(
            ctx.ingress_ifindex() as u32,
            u64::from(xdp_action::XDP_PASS),
        )
        .map_err(|_| Error::NoEgress)
}
