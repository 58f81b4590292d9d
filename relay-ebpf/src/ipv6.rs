//! IPv6: parsing the incoming header, writing the outgoing one.

use aya_ebpf::programs::XdpContext;
use relay_common::checksum::AddrWords;

use crate::{
    error::Error,
    family::{Family, FibAddrs, IpMeta, IpOut},
    packet::{ETH_LEN, ETH_P_IPV6, IPPROTO_UDP, UDP_LEN, be16, frame_len, ref_at, write_at},
};

const AF_INET6: u8 = 10;
const NEXT_HEADER_FRAGMENT: u8 = 44;

/// The IPv6 header (RFC 8200 §3).
#[repr(C)]
#[derive(Clone, Copy)]
struct Ipv6Hdr {
    /// Version, traffic class, flow label.
    vtcfl: [u8; 4],
    payload_len: [u8; 2],
    next_header: u8,
    hop_limit: u8,
    src: AddrWords,
    dst: AddrWords,
}

pub struct Ipv6;

impl Family for Ipv6 {
    const IPV4: bool = false;
    const HEADER_LEN: usize = 40;
    const ETHER_TYPE: u16 = ETH_P_IPV6;

    #[inline(always)]
    fn parse(ctx: &XdpContext) -> Result<IpMeta, Error> {
        let h: &Ipv6Hdr = ref_at(ctx, ETH_LEN, Error::Malformed)?;
        if h.vtcfl[0] >> 4 != 6 {
            return Err(Error::Malformed);
        }
        match h.next_header {
            IPPROTO_UDP => {}
            NEXT_HEADER_FRAGMENT => return Err(Error::Fragment),
            // Hop-by-hop, routing, destination options, AH, ESP, mobility, HIP, shim6,
            // experimental (RFC 8200 §4, IANA "IPv6 Extension Header Types").
            0 | 43 | 60 | 51 | 50 | 135 | 139 | 140 | 253 | 254 => {
                return Err(Error::IpOptions);
            }
            _ => return Err(Error::NotOurs),
        }
        let payload_len = be16(h.payload_len) as usize;
        // 0 would be a jumbogram (RFC 2675), which needs a hop-by-hop header anyway.
        if payload_len < UDP_LEN || ETH_LEN + Self::HEADER_LEN + payload_len > frame_len(ctx) {
            return Err(Error::Malformed);
        }
        // IPv4-mapped addresses must not appear on the wire (RFC 4291 §2.5.5.2); in a map key
        // they would stand for an IPv4 host.
        if is_mapped(&h.src) || is_mapped(&h.dst) {
            return Err(Error::Malformed);
        }
        Ok(IpMeta {
            tos: (h.vtcfl[0] << 4) | (h.vtcfl[1] >> 4),
            ttl: h.hop_limit,
            payload_len: payload_len as u16,
        })
    }

    #[inline(always)]
    fn key_addrs(ctx: &XdpContext) -> Result<(AddrWords, AddrWords), Error> {
        let h: &Ipv6Hdr = ref_at(ctx, ETH_LEN, Error::Malformed)?;
        Ok((h.src, h.dst))
    }

    #[inline(always)]
    fn pseudo_addrs(ctx: &XdpContext) -> Result<(&[u16], &[u16]), Error> {
        let h: &Ipv6Hdr = ref_at(ctx, ETH_LEN, Error::Malformed)?;
        Ok((&h.src, &h.dst))
    }

    #[inline(always)]
    fn write(ctx: &XdpContext, out: &IpOut<'_>) -> Result<(), Error> {
        // Flow label 0: relaying joins two different flows, so it is not copied (RFC 6156 §9).
        let h = Ipv6Hdr {
            vtcfl: [0x60 | (out.tos >> 4), out.tos << 4, 0, 0],
            payload_len: out.payload_len.to_be_bytes(),
            next_header: IPPROTO_UDP,
            hop_limit: out.ttl,
            src: *out.src,
            dst: *out.dst,
        };
        write_at(ctx, ETH_LEN, h)
    }

    #[inline(always)]
    fn fib_addrs(src: &[u32; 4], dst: &[u32; 4], _tos: u8) -> FibAddrs {
        FibAddrs {
            family: AF_INET6,
            tos_or_flowinfo: 0,
            src: *src,
            dst: *dst,
        }
    }
}

#[inline(always)]
fn is_mapped(w: &AddrWords) -> bool {
    (w[0] | w[1] | w[2] | w[3] | w[4]) == 0 && w[5] == 0xffff
}
