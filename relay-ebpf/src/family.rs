//! What differs between IPv4 and IPv6 for the rewrites: parsing the incoming IP header,
//! writing the outgoing one, and the FIB lookup parameters.
//!
//! [`to_peer`](crate::to_peer) and [`to_client`](crate::to_client) are generic over an input
//! and an output [`Family`]; each of the 2 x 2 x 2 combinations is monomorphized into its own
//! BPF function with constant header offsets, which is what the verifier wants.
//!
//! Addresses are handled as [`Words`](relay_common::checksum::Words) (16-bit words in memory
//! order) and read from the frame or the map where they are, just before use: a value held in
//! a register across a helper call would have to be spilled to the 512-byte stack.

use aya_ebpf::programs::XdpContext;
use relay_common::{Endpoint, checksum::AddrWords};

use crate::error::Error;

/// The scalar fields of an incoming IP header that the rewrites need.
#[derive(Clone, Copy)]
pub struct IpMeta {
    /// IPv4 TOS / IPv6 traffic class: DSCP and ECN.
    pub tos: u8,
    /// IPv4 TTL / IPv6 hop limit.
    pub ttl: u8,
    /// Bytes after the IP header, as the IP header says (the UDP datagram).
    pub payload_len: u16,
}

/// The outgoing IP header. Addresses in map form (IPv4-mapped for IPv4).
pub struct IpOut<'a> {
    pub src: &'a AddrWords,
    pub dst: &'a AddrWords,
    pub tos: u8,
    pub ttl: u8,
    /// The UDP datagram's length.
    pub payload_len: u16,
}

/// The family-specific part of a FIB lookup: addresses as the kernel's `__be32` fields take
/// them (IPv4 in the first word).
pub struct FibAddrs {
    pub family: u8,
    /// IPv4 TOS in the first byte (IPv6: 0, the flow information is not used here).
    pub tos_or_flowinfo: u32,
    pub src: [u32; 4],
    pub dst: [u32; 4],
}

pub trait Family {
    /// IPv4 (else IPv6).
    const IPV4: bool;
    /// Length of the IP header this program reads and writes (no options/extensions).
    const HEADER_LEN: usize;
    const ETHER_TYPE: u16;

    /// Parses and checks the IP header after the Ethernet header. Non-UDP, fragments and
    /// options/extension headers are not ours; inconsistent lengths are malformed.
    fn parse(ctx: &XdpContext) -> Result<IpMeta, Error>;

    /// Source and destination in map form (IPv4-mapped), for the map keys.
    fn key_addrs(ctx: &XdpContext) -> Result<(AddrWords, AddrWords), Error>;

    /// Source and destination as the UDP pseudo-header carries them (2 or 8 words), read in
    /// place. Only valid until the frame is changed.
    fn pseudo_addrs(ctx: &XdpContext) -> Result<(&[u16], &[u16]), Error>;

    /// Writes a fresh IP header after the Ethernet header (the frame is already sized).
    fn write(ctx: &XdpContext, out: &IpOut<'_>) -> Result<(), Error>;

    /// The addresses of a FIB lookup for a datagram `src` -> `dst` (map form, as `u32`s).
    fn fib_addrs(src: &[u32; 4], dst: &[u32; 4], tos: u8) -> FibAddrs;
}

/// The part of a map-form address that family `F`'s pseudo-header carries.
#[inline(always)]
pub fn pseudo<F: Family>(ip: &AddrWords) -> &[u16] {
    if F::IPV4 { &ip[6..] } else { &ip[..] }
}

/// An endpoint's address as words, in place in the map value.
#[inline(always)]
pub fn endpoint_words(endpoint: &Endpoint) -> &AddrWords {
    // SAFETY: `Endpoint` is `repr(C, align(4))` with `ip` at offset 0, so the 16 bytes are
    // suitably aligned for `[u16; 8]`; same size, every bit pattern valid.
    unsafe { &*(endpoint.ip.as_ptr() as *const AddrWords) }
}

/// Sets a key endpoint: map-form address words, port, zero padding.
#[inline(always)]
pub fn set_endpoint(endpoint: &mut Endpoint, ip: &AddrWords, port: u16) {
    // SAFETY: as in `endpoint_words`.
    unsafe { *(endpoint.ip.as_mut_ptr() as *mut AddrWords) = *ip };
    endpoint.port = port;
    endpoint._pad = [0; 2];
}

/// An endpoint's address as four `u32`s (memory order), in place in the map value.
#[inline(always)]
pub fn endpoint_dwords(endpoint: &Endpoint) -> &[u32; 4] {
    // SAFETY: as in `endpoint_words`; `Endpoint` is aligned to 4.
    unsafe { &*(endpoint.ip.as_ptr() as *const [u32; 4]) }
}
