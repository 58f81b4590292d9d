//! Where a rewritten frame goes: the egress interface and both MAC addresses come from the
//! next hop the agent cached in the binding (resolved from the kernel's routing and neighbour
//! tables and kept true as they change), or, when none is cached, from a FIB lookup for the new
//! addresses. The frame leaves with `XDP_TX` on the interface it came in on, or with
//! `bpf_redirect_map` through [`RAMPART_EGRESS`](crate::maps::EGRESS) to another one the agent
//! registered.
//!
//! This happens before the frame is modified, so every failure leaves it untouched for the
//! kernel stack (`XDP_PASS`): userspace serves that datagram, and the stack resolves a
//! missing neighbour on the way.

use core::mem::size_of;

use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_FWD_DISABLED, BPF_FIB_LKUP_RET_SUCCESS,
        bpf_fib_lookup, bpf_fib_lookup__bindgen_ty_1, bpf_fib_lookup__bindgen_ty_2,
        bpf_fib_lookup__bindgen_ty_3, bpf_fib_lookup__bindgen_ty_4, bpf_fib_lookup__bindgen_ty_5,
        xdp_action,
    },
    helpers::generated::bpf_fib_lookup as fib_lookup,
    programs::XdpContext,
};

use relay_common::NextHop;

use crate::{
    error::Error,
    family::Family,
    maps::{EGRESS, SETTINGS, scratch},
    packet::IPPROTO_UDP,
};

/// The egress decided for a frame.
pub struct Egress {
    pub ifindex: u32,
    /// Egress interface's MAC.
    pub src_mac: [u8; 6],
    /// Next hop's MAC (from the neighbour table).
    pub dst_mac: [u8; 6],
    /// Egress is the ingress interface.
    pub tx: bool,
}

/// The new datagram's addressing, for the lookup.
pub struct Route<'a> {
    /// Map-form addresses as `u32`s (see `family::endpoint_dwords`).
    pub src: &'a [u32; 4],
    pub dst: &'a [u32; 4],
    pub src_port: u16,
    pub dst_port: u16,
    pub tos: u8,
    /// Length of the new IP packet (header included): the lookup checks it against the
    /// egress MTU.
    pub ip_len: u16,
}

/// The egress of a datagram of family `F` (the *output* family): the binding's cached next
/// hop, else a FIB lookup.
#[inline(always)]
pub fn lookup<F: Family>(
    ctx: &XdpContext,
    next_hop: &NextHop,
    route: &Route<'_>,
) -> Result<Egress, Error> {
    let ingress = ctx.ingress_ifindex() as u32;
    if next_hop.is_cached() {
        // The agent caches only egresses it registered in the devmap (or the ingress).
        if route.ip_len > next_hop.mtu {
            return Err(Error::FragNeeded);
        }
        return Ok(Egress {
            ifindex: next_hop.ifindex,
            src_mac: next_hop.src_mac,
            dst_mac: next_hop.dst_mac,
            tx: next_hop.ifindex == ingress,
        });
    }
    fib_lookup_egress::<F>(ctx, ingress, route)
}

/// The fallback: a FIB lookup as for a forwarded packet, with the parameters in the per-CPU
/// scratch map, not on the stack.
#[inline(always)]
fn fib_lookup_egress<F: Family>(
    ctx: &XdpContext,
    ingress: u32,
    route: &Route<'_>,
) -> Result<Egress, Error> {
    let addrs = F::fib_addrs(route.src, route.dst, route.tos);
    // Cannot fail: index 0 of a one-entry array.
    let scratch = scratch().ok_or(Error::FibMiss)?;
    let params = &mut scratch.fib;
    // Every input field written; the outputs (MACs, ifindex) come back in place.
    params.family = addrs.family;
    params.l4_protocol = IPPROTO_UDP;
    params.sport = route.src_port.to_be();
    params.dport = route.dst_port.to_be();
    params.__bindgen_anon_1 = bpf_fib_lookup__bindgen_ty_1 {
        tot_len: route.ip_len,
    };
    params.ifindex = ingress;
    params.__bindgen_anon_2 = bpf_fib_lookup__bindgen_ty_2 {
        flowinfo: addrs.tos_or_flowinfo,
    };
    params.__bindgen_anon_3 = bpf_fib_lookup__bindgen_ty_3 {
        ipv6_src: addrs.src,
    };
    params.__bindgen_anon_4 = bpf_fib_lookup__bindgen_ty_4 {
        ipv6_dst: addrs.dst,
    };
    params.__bindgen_anon_5 = bpf_fib_lookup__bindgen_ty_5 { tbid: 0 };

    // A lookup as for a forwarded packet (routes, then the neighbour table), from the ingress
    // interface's point of view; the agent sets BPF_FIB_LOOKUP_DIRECT (skip the policy rules)
    // only when the host has none beyond the default ones.
    let flags = SETTINGS.get(0).map_or(0, |s| s.fib_flags);
    // SAFETY: `params` is a valid, writable `bpf_fib_lookup` of the size passed.
    let rc = unsafe {
        fib_lookup(
            ctx.as_ptr(),
            params,
            size_of::<bpf_fib_lookup>() as i32,
            flags,
        )
    };
    match rc {
        rc if rc == BPF_FIB_LKUP_RET_SUCCESS as i64 => {}
        rc if rc == BPF_FIB_LKUP_RET_FWD_DISABLED as i64 => return Err(Error::ForwardingDisabled),
        rc if rc == BPF_FIB_LKUP_RET_FRAG_NEEDED as i64 => return Err(Error::FragNeeded),
        _ => return Err(Error::FibMiss),
    }

    let ifindex = params.ifindex;
    let tx = ifindex == ingress;
    if !tx && EGRESS.get(ifindex).is_none() {
        return Err(Error::NoEgress);
    }
    Ok(Egress {
        ifindex,
        src_mac: params.smac,
        dst_mac: params.dmac,
        tx,
    })
}

impl Egress {
    /// The action that sends the rewritten frame.
    #[inline(always)]
    pub fn send(&self) -> Result<u32, Error> {
        if self.tx {
            return Ok(xdp_action::XDP_TX);
        }
        // If the entry vanished since `lookup`, the helper returns the low bits of the flags:
        // drop, since the frame is already rewritten.
        EGRESS
            .redirect(self.ifindex, u64::from(xdp_action::XDP_DROP))
            .map_err(|_| Error::AfterRewrite)
    }
}
