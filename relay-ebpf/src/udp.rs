//! The incoming UDP header.

use aya_ebpf::programs::XdpContext;

use crate::{
    error::Error,
    family::{Family, IpMeta},
    packet::{ETH_LEN, UdpHdr, be16, ref_at},
};

/// A parsed incoming datagram: the scalars the rewrites need (addresses are read from the
/// frame where needed).
#[derive(Clone, Copy)]
pub struct Datagram {
    pub src_port: u16,
    pub dst_port: u16,
    /// UDP header + payload.
    pub udp_len: u16,
    /// As received; 0 means "no checksum" (IPv4 only).
    pub udp_check: u16,
    /// IPv4 TOS / IPv6 traffic class.
    pub tos: u8,
    /// IPv4 TTL / IPv6 hop limit.
    pub ttl: u8,
    /// The frame's length as received (for the statistics).
    pub frame_len: usize,
}

/// Parses the UDP header after an `F` header; its length must be the IP payload's.
#[inline(always)]
pub fn parse<F: Family>(
    ctx: &XdpContext,
    ip: &IpMeta,
    frame_len: usize,
) -> Result<Datagram, Error> {
    let h: &UdpHdr = ref_at(ctx, ETH_LEN + F::HEADER_LEN, Error::Malformed)?;
    let udp_len = be16(h.len);
    // The IP layer already checked that its payload (>= 8 bytes) is inside the frame.
    if udp_len != ip.payload_len {
        return Err(Error::Malformed);
    }
    Ok(Datagram {
        src_port: be16(h.src_port),
        dst_port: be16(h.dst_port),
        udp_len,
        udp_check: be16(h.check),
        tos: ip.tos,
        ttl: ip.ttl,
        frame_len,
    })
}
