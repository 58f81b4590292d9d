//! Rampart's XDP program: the kernel fast path of the TURN relay.
//!
//! For every bound channel it forwards, in the kernel:
//! - client -> peer ([`to_peer`]): ChannelData to the TURN server's address becomes plain UDP
//!   from the allocation's relay address to the peer;
//! - peer -> client ([`to_client`]): UDP from the peer to the relay address becomes ChannelData
//!   from the TURN server's address to the client;
//!
//! over IPv4 and IPv6 on either side ([`ipv4`], [`ipv6`], [`family`]), with the UDP checksum
//! updated incrementally (`relay_common::checksum`) and the egress taken from the next hop the
//! agent cached in the binding, or found by a FIB lookup when none is cached ([`egress`]). The
//! agent fills the maps ([`maps`]): channel bindings with an expiry and their next hops, the
//! per-channel counters, the egress interfaces, the fallback lookup's flags. Anything the program does not own, or cannot
//! forward right now, goes to userspace unchanged (`XDP_PASS`) and is counted by reason
//! ([`error`]).
//!
//! Shape, and what the verifier and the 512-byte stack asked for:
//! - each direction x input family x output family is monomorphized from one generic source
//!   ([`rewrite::rewrite`]), with constant header offsets; IPv4 -> IPv4 is inlined here (calls
//!   are dear where returns are mitigated), the other six are BPF functions of their own: one
//!   function holding all eight would not fit the stack;
//! - the map keys and the FIB lookup parameters live in a per-CPU scratch map, not on the
//!   stack; addresses are read as 16-bit words where they are (frame, map value) and the UDP
//!   checksum is settled before the helper calls, so little is spilled;
//! - `Error` is `repr(u32)` so that no `Result` carries undefined bits into a register the
//!   verifier would refuse to read;
//! - the egress map is a `DEVMAP_HASH` keyed by ifindex (an array would bound the ifindex by
//!   its size).
//!
//! Relayed datagrams follow RFC 8656's preferred IP header behaviour: TTL / hop limit one less
//! than received (not relayed at 1: userspace handles it), DSCP/ECN copied, IPv6 flow label 0;
//! IPv4 goes out with DF and identification 0, as the userspace relay's sockets send.
//!
//! The object also holds [`reference`], the fixed minimal forwarder that `cargo xtask bench-xdp`
//! measures beside this program; the agent never loads it.
//!
//! This crate is built for `bpfel-unknown-none` by `rampart-xdp`'s build script (aya-build). On
//! the host it still compiles (as an empty binary), so that `cargo clippy --workspace` lints the
//! program's code too.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
// The non-fetch atomic add of the bandwidth budgets (`maps::Charge`): the BPF target has no
// `fetch_add` without compare-and-swap, only this intrinsic.
#![cfg_attr(
    target_arch = "bpf",
    feature(core_intrinsics),
    allow(internal_features)
)]
// On the host only `main` is reachable; the program's code is linted but never run there.
#![cfg_attr(not(target_arch = "bpf"), allow(dead_code))]

mod egress;
mod error;
mod family;
mod ipv4;
mod ipv6;
mod maps;
mod packet;
mod reference;
mod rewrite;
mod to_client;
mod to_peer;
mod udp;

use crate::{
    error::Error,
    family::{Family, set_endpoint},
    ipv4::Ipv4,
    ipv6::Ipv6,
    maps::{CLIENT_CHANNELS, PEER_CHANNELS, count, scratch},
    packet::{
        CHANNEL_HEADER_LEN, ETH_LEN, ETH_P_8021AD, ETH_P_8021Q, ETH_P_IPV4, ETH_P_IPV6, EthHdr,
        UDP_LEN, be16, frame_len, read_at,
    },
};
use aya_ebpf::{macros::xdp, programs::XdpContext};

/// STUN magic cookie (RFC 8489 §5), bytes 4-7 of every STUN message.
const MAGIC_COOKIE: [u8; 4] = [0x21, 0x12, 0xa4, 0x42];
/// STUN header length.
const STUN_HEADER_LEN: usize = 20;

#[xdp]
pub fn rampart_xdp(ctx: XdpContext) -> u32 {
    let bytes = frame_len(&ctx);
    // Every outcome is counted in its own slot; `Stat::Seen` is their sum, made by the reader.
    match try_forward(&ctx, bytes) {
        // Counted by the rewrite.
        Ok(action) => action,
        Err(error) => {
            count(error.stat(), bytes);
            error.action()
        }
    }
}

#[inline(always)]
fn try_forward(ctx: &XdpContext, frame_len: usize) -> Result<u32, Error> {
    let eth: EthHdr = read_at(ctx, 0, Error::Malformed)?;
    match be16(eth.ether_type) {
        ETH_P_IPV4 => forward::<Ipv4>(ctx, frame_len),
        ETH_P_IPV6 => forward::<Ipv6>(ctx, frame_len),
        ETH_P_8021Q | ETH_P_8021AD => Err(Error::Vlan),
        _ => Err(Error::NotOurs),
    }
}

/// Finds the binding an `In` datagram belongs to and hands it to the rewrite for its
/// direction. `Ok` is the action of a frame the rewrite already counted.
#[inline(always)]
fn forward<In: Family>(ctx: &XdpContext, frame_len: usize) -> Result<u32, Error> {
    let ip = In::parse(ctx)?;
    let datagram = udp::parse::<In>(ctx, &ip, frame_len)?;
    let payload = ETH_LEN + In::HEADER_LEN + UDP_LEN;
    let payload_len = datagram.udp_len as usize - UDP_LEN;
    // The keys are built in the per-CPU scratch map (cannot fail: index 0 of one entry).
    let scratch = scratch().ok_or(Error::NotOurs)?;

    // The first payload byte: ChannelData if the leading bits are 01 (RFC 8656 §12, RFC 7983).
    let mut first = 0u8;
    if payload_len >= CHANNEL_HEADER_LEN {
        let head: [u8; 4] = read_at(ctx, payload, Error::Malformed)?;
        first = head[0];
        if first & 0xc0 == 0x40 {
            let (src, dst) = In::key_addrs(ctx)?;
            let key = &mut scratch.client_key;
            set_endpoint(&mut key.client, &src, datagram.src_port);
            set_endpoint(&mut key.server, &dst, datagram.dst_port);
            key.channel = be16([head[0], head[1]]);
            key._pad = [0; 2];
            // SAFETY: the agent (one writer) replaces whole entries; a reference into a hash
            // map value stays valid for the program's run (RCU).
            #[allow(clippy::needless_borrows_for_generic_args)]
            // by value would copy it to the stack
            if let Some(binding) = unsafe { CLIENT_CHANNELS.get(&*key) } {
                return to_peer::forward::<In>(ctx, &datagram, binding);
            }
        }
    }

    // Not a client's bound channel: a peer's datagram to a relay address? Its payload is
    // anything, ChannelData-looking bytes included.
    let (src, dst) = In::key_addrs(ctx)?;
    let key = &mut scratch.peer_key;
    set_endpoint(&mut key.relay, &dst, datagram.dst_port);
    set_endpoint(&mut key.peer, &src, datagram.src_port);
    // SAFETY: as above.
    #[allow(clippy::needless_borrows_for_generic_args)] // by value would copy it to the stack
    if let Some(binding) = unsafe { PEER_CHANNELS.get(&*key) } {
        return to_client::forward::<In>(ctx, &datagram, binding);
    }

    // Nobody's: say what it looked like.
    if payload_len >= CHANNEL_HEADER_LEN && first & 0xc0 == 0x40 {
        return Err(Error::UnboundChannel);
    }
    if payload_len >= STUN_HEADER_LEN && first & 0xc0 == 0 {
        let cookie: [u8; 4] = read_at(ctx, payload + 4, Error::Malformed)?;
        if cookie == MAGIC_COOKIE {
            return Err(Error::Stun);
        }
    }
    Err(Error::NotOurs)
}

relay_common::ebpf_binary!(
    "relay-ebpf is an XDP program: rampart-xdp's build script builds it for bpfel-unknown-none \
     and embeds it in the agent; this host binary does nothing"
);
