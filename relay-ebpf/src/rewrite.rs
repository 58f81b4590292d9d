//! What the two directions' rewrites share: how each family pair is called and its outcome
//! counted, the checksum fields, and the new headers.

use aya_ebpf::{bindings::xdp_md, programs::XdpContext};
use relay_common::{
    Endpoint, NextHop, Stat,
    checksum::{self, UdpFields},
};

use crate::{
    egress::{self, Egress, Route},
    error::{Error, finish},
    family::{Family, IpOut, endpoint_dwords, endpoint_words, pseudo},
    packet::{ETH_LEN, EthHdr, UdpHdr, adjust_head, write_at},
    udp::Datagram,
};

/// One direction's rewrite ([`to_peer`](crate::to_peer), [`to_client`](crate::to_client)).
pub trait Rewrite {
    /// The map value the frame matched.
    type Binding;
    /// Counted for every frame this direction forwards.
    const FORWARDED: Stat;

    /// Checks the datagram against its allocation's bandwidth limit (and charges it), before
    /// anything else is done with it: `Err(OverLimit)` drops it.
    fn police<In: Family>(
        ctx: &XdpContext,
        datagram: &Datagram,
        binding: &Self::Binding,
    ) -> Result<(), Error>;

    /// Rewrites an `In` frame into an `Out` one and returns its action. Before the frame is
    /// changed an `Err` leaves it as it came (`XDP_PASS`); after, it drops it.
    fn try_rewrite<In: Family, Out: Family>(
        ctx: &XdpContext,
        datagram: &Datagram,
        binding: &Self::Binding,
    ) -> Result<u32, Error>;
}

/// Rewrites and counts the frame. IPv4 -> IPv4, the common case, is inlined into the caller:
/// where returns are mitigated (AMD's SRSO "Safe RET") a BPF-to-BPF call and its return cost
/// about 13 ns on the benchmark's VM (docs/benchmarks.md). The other pairs are BPF functions
/// of their own, each with its own stack frame: all eight inlined exceed the 512-byte BPF
/// stack, and so do the IPv6 pairs inlined beside a cross-family call.
#[inline(always)]
pub fn rewrite<R: Rewrite, In: Family, Out: Family>(
    ctx: *mut xdp_md,
    datagram: &Datagram,
    binding: &R::Binding,
) -> u32 {
    if In::IPV4 && Out::IPV4 {
        counted::<R, In, Out>(ctx, datagram, binding)
    } else {
        apart::<R, In, Out>(ctx, datagram, binding)
    }
}

#[inline(never)]
fn apart<R: Rewrite, In: Family, Out: Family>(
    ctx: *mut xdp_md,
    datagram: &Datagram,
    binding: &R::Binding,
) -> u32 {
    counted::<R, In, Out>(ctx, datagram, binding)
}

#[inline(always)]
fn counted<R: Rewrite, In: Family, Out: Family>(
    ctx: *mut xdp_md,
    datagram: &Datagram,
    binding: &R::Binding,
) -> u32 {
    let ctx = XdpContext::new(ctx);
    // Policed at the start, where little is live: further in, what it needs spilled onto a
    // stack that has no room left.
    let result = match R::police::<In>(&ctx, datagram, binding) {
        Ok(()) => R::try_rewrite::<In, Out>(&ctx, datagram, binding),
        Err(error) => Err(error),
    };
    finish(result, R::FORWARDED, datagram.frame_len)
}

/// The datagram a rewrite sends: from `src` to `dst` (the binding's map-form endpoints), with
/// `udp_len` bytes of UDP, header included.
pub struct Outgoing<'a> {
    pub src: &'a Endpoint,
    pub dst: &'a Endpoint,
    pub udp_len: u16,
}

/// What the UDP checksum covers of the `In` datagram as received and of the `Out` one it
/// becomes, for the incremental update; `None` when the datagram carries no checksum (IPv4 to
/// IPv4 keeps none). Refused first, before anything is changed: an IPv6 datagram without a
/// checksum (RFC 8200 §8.1: the stack drops it), one without a checksum that would leave over
/// IPv6, and a field left to offload (not a checksum of the datagram, so not to be updated).
#[inline(always)]
pub fn checksum_fields<'a, In: Family, Out: Family>(
    ctx: &'a XdpContext,
    datagram: &Datagram,
    out: &Outgoing<'a>,
) -> Result<Option<(UdpFields<'a>, UdpFields<'a>)>, Error> {
    if datagram.udp_check == 0 {
        if !In::IPV4 {
            return Err(Error::Malformed);
        }
        if !Out::IPV4 {
            return Err(Error::ChecksumZeroV6);
        }
        return Ok(None);
    }
    let (old_src, old_dst) = In::pseudo_addrs(ctx)?;
    if checksum::is_offload_partial(datagram.udp_check, old_src, old_dst, datagram.udp_len) {
        return Err(Error::ChecksumPartial);
    }
    Ok(Some((
        UdpFields {
            src_ip: old_src,
            dst_ip: old_dst,
            src_port: datagram.src_port,
            dst_port: datagram.dst_port,
            udp_len: datagram.udp_len,
        },
        UdpFields {
            src_ip: pseudo::<Out>(endpoint_words(out.src)),
            dst_ip: pseudo::<Out>(endpoint_words(out.dst)),
            src_port: out.src.port,
            dst_port: out.dst.port,
            udp_len: out.udp_len,
        },
    )))
}

/// Finds the egress of the `Out` datagram (before anything is written, so that a failure leaves
/// the frame to the stack), moves the frame's start by `head_delta` bytes (positive: drops
/// bytes) and writes the new Ethernet, IP and UDP headers, with `check` as the UDP checksum.
/// From here on a failure drops the frame. The caller writes what follows the UDP header, cuts
/// the tail and sends.
#[inline(always)]
pub fn write_headers<Out: Family>(
    ctx: &XdpContext,
    next_hop: &NextHop,
    datagram: &Datagram,
    out: &Outgoing<'_>,
    ttl: u8,
    check: u16,
    head_delta: i32,
) -> Result<Egress, Error> {
    let egress = egress::lookup::<Out>(
        ctx,
        next_hop,
        &Route {
            src: endpoint_dwords(out.src),
            dst: endpoint_dwords(out.dst),
            src_port: out.src.port,
            dst_port: out.dst.port,
            tos: datagram.tos,
            ip_len: Out::HEADER_LEN as u16 + out.udp_len,
        },
    )?;
    adjust_head(ctx, head_delta)?;
    write_at(
        ctx,
        0,
        EthHdr {
            dst: egress.dst_mac,
            src: egress.src_mac,
            ether_type: Out::ETHER_TYPE.to_be_bytes(),
        },
    )?;
    Out::write(
        ctx,
        &IpOut {
            src: endpoint_words(out.src),
            dst: endpoint_words(out.dst),
            tos: datagram.tos,
            ttl,
            payload_len: out.udp_len,
        },
    )?;
    write_at(
        ctx,
        ETH_LEN + Out::HEADER_LEN,
        UdpHdr {
            src_port: out.src.port.to_be_bytes(),
            dst_port: out.dst.port.to_be_bytes(),
            len: out.udp_len.to_be_bytes(),
            check: check.to_be_bytes(),
        },
    )?;
    Ok(egress)
}
