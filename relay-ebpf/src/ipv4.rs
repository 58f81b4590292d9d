//! IPv4: parsing the incoming header, writing the outgoing one.

use aya_ebpf::programs::XdpContext;
use relay_common::checksum::{self, AddrWords, Words};

use crate::{
    error::Error,
    family::{Family, FibAddrs, IpMeta, IpOut},
    packet::{ETH_LEN, ETH_P_IPV4, IPPROTO_UDP, UDP_LEN, frame_len, ref_at, write_at},
};

const AF_INET: u8 = 2;
/// Flags/fragment offset field: the fragment offset and More Fragments bits.
const FRAGMENT_MASK: u16 = 0x3fff;
/// Don't Fragment.
const DF: u16 = 0x4000;

/// The IPv4 header (RFC 791) in 16-bit words, memory order.
#[repr(C)]
#[derive(Clone, Copy)]
struct Ipv4Hdr {
    /// Version/IHL, TOS, total length, identification, flags/fragment offset, TTL/protocol.
    head: [u16; 5],
    check: u16,
    src: [u16; 2],
    dst: [u16; 2],
}

impl Ipv4Hdr {
    #[inline(always)]
    fn byte(&self, i: usize) -> u8 {
        self.head[i / 2].to_ne_bytes()[i % 2]
    }
    #[inline(always)]
    fn be16(&self, word: usize) -> u16 {
        u16::from_be(self.head[word])
    }
    #[inline(always)]
    fn words(&self) -> &Words<10> {
        // SAFETY: `repr(C)` of ten `u16`s: same size and alignment as `[u16; 10]`.
        unsafe { &*(self as *const Self as *const Words<10>) }
    }
}

/// Map form (`::ffff:a.b.c.d`) of an IPv4 address given as two words.
#[inline(always)]
fn mapped(words: &[u16; 2]) -> AddrWords {
    const FFFF: u16 = u16::from_ne_bytes([0xff, 0xff]);
    [0, 0, 0, 0, 0, FFFF, words[0], words[1]]
}

pub struct Ipv4;

impl Family for Ipv4 {
    const IPV4: bool = true;
    const HEADER_LEN: usize = 20;
    const ETHER_TYPE: u16 = ETH_P_IPV4;

    #[inline(always)]
    fn parse(ctx: &XdpContext) -> Result<IpMeta, Error> {
        let h: &Ipv4Hdr = ref_at(ctx, ETH_LEN, Error::Malformed)?;
        let version_ihl = h.byte(0);
        if version_ihl >> 4 != 4 {
            return Err(Error::Malformed);
        }
        match version_ihl & 0x0f {
            5 => {}
            0..=4 => return Err(Error::Malformed),
            _ => return Err(Error::IpOptions),
        }
        if h.be16(3) & FRAGMENT_MASK != 0 {
            return Err(Error::Fragment);
        }
        if h.byte(9) != IPPROTO_UDP {
            return Err(Error::NotOurs);
        }
        let total_len = h.be16(1) as usize;
        // The frame may be longer (Ethernet trailer), never shorter.
        if total_len < Self::HEADER_LEN + UDP_LEN || ETH_LEN + total_len > frame_len(ctx) {
            return Err(Error::Malformed);
        }
        // The stack would drop a corrupted header; so must we, since we write a fresh one.
        if !checksum::ipv4_header_is_valid(h.words()) {
            return Err(Error::Malformed);
        }
        Ok(IpMeta {
            tos: h.byte(1),
            ttl: h.byte(8),
            payload_len: (total_len - Self::HEADER_LEN) as u16,
        })
    }

    #[inline(always)]
    fn key_addrs(ctx: &XdpContext) -> Result<(AddrWords, AddrWords), Error> {
        let h: &Ipv4Hdr = ref_at(ctx, ETH_LEN, Error::Malformed)?;
        Ok((mapped(&h.src), mapped(&h.dst)))
    }

    #[inline(always)]
    fn pseudo_addrs(ctx: &XdpContext) -> Result<(&[u16], &[u16]), Error> {
        let h: &Ipv4Hdr = ref_at(ctx, ETH_LEN, Error::Malformed)?;
        Ok((&h.src, &h.dst))
    }

    #[inline(always)]
    fn write(ctx: &XdpContext, out: &IpOut<'_>) -> Result<(), Error> {
        let total_len = Self::HEADER_LEN as u16 + out.payload_len;
        // Identification 0 with DF set: an atomic datagram (RFC 6864 §4), as Linux sends from
        // an unconnected socket, with DF as userspace sets it (IP_PMTUDISC_DO).
        let mut h = Ipv4Hdr {
            head: [
                u16::from_ne_bytes([0x45, out.tos]),
                total_len.to_be(),
                0,
                DF.to_be(),
                u16::from_ne_bytes([out.ttl, IPPROTO_UDP]),
            ],
            check: 0,
            src: [out.src[6], out.src[7]],
            dst: [out.dst[6], out.dst[7]],
        };
        h.check = checksum::ipv4_header(h.words()).to_be();
        write_at(ctx, ETH_LEN, h)
    }

    #[inline(always)]
    fn fib_addrs(src: &[u32; 4], dst: &[u32; 4], tos: u8) -> FibAddrs {
        FibAddrs {
            family: AF_INET,
            tos_or_flowinfo: u32::from_ne_bytes([tos, 0, 0, 0]),
            src: [src[3], 0, 0, 0],
            dst: [dst[3], 0, 0, 0],
        }
    }
}
