//! Rampart's reuseport program: every relay loop listens on the same TURN address with
//! `SO_REUSEPORT`, and this program picks, for each client datagram, the loop that owns the
//! client (`relay_common::steering::owner` of its source address and port), so that a client
//! always reaches the loop holding its allocation and the loops share no state on the data
//! path. The agent computes the same function.
//!
//! The context's data starts at the UDP header (source port first); the source address is read
//! from the network header with `bpf_skb_load_bytes_relative`. Anything it cannot place is left
//! to the kernel's own hash (`SK_PASS` without a selection), and the agent hands such a
//! datagram to its owner.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
#![cfg_attr(not(target_arch = "bpf"), allow(dead_code, unused_imports))]

use aya_ebpf::{
    EbpfContext as _,
    bindings::{bpf_hdr_start_off::BPF_HDR_START_NET, sk_action::SK_PASS},
    helpers::generated::bpf_skb_load_bytes_relative,
    macros::{map, sk_reuseport},
    maps::{Array, ReusePortSockArray},
    programs::SkReuseportContext,
};
use relay_common::steering::{MAX_LOOPS, owner};

#[map(name = "RAMPART_STEER_SOCKETS")]
static SOCKETS: ReusePortSockArray = ReusePortSockArray::with_max_entries(MAX_LOOPS, 0);

#[map(name = "RAMPART_STEER_LOOPS")]
static LOOPS: Array<u32> = Array::with_max_entries(1, 0);

/// `eth_protocol` is in network byte order.
const ETH_P_IP: u32 = 0x0800u16.to_be() as u32;
const ETH_P_IPV6: u32 = 0x86DDu16.to_be() as u32;
/// Offsets of the source address in the IPv4 and IPv6 headers.
const IPV4_SOURCE: u32 = 12;
const IPV6_SOURCE: u32 = 8;
const UDP_HEADER_LEN: usize = 8;

#[sk_reuseport]
pub fn rampart_steer(ctx: SkReuseportContext) -> u32 {
    let Some(&loops) = LOOPS.get(0) else {
        return SK_PASS;
    };
    let data = ctx.data();
    if data + UDP_HEADER_LEN > ctx.data_end() {
        return SK_PASS;
    }
    // SAFETY: the two bytes lie within [data, data_end), checked above.
    let port = unsafe { *(data as *const [u8; 2]) };
    let mut address = [0u8; 16];
    // Constant lengths for each family: the verifier wants to see the helper's size.
    // SAFETY: `address` has room for 16 bytes; the helper bounds-checks the packet itself.
    let (loaded, address_len) = match ctx.eth_protocol() {
        ETH_P_IP => (
            unsafe {
                bpf_skb_load_bytes_relative(
                    ctx.as_ptr(),
                    IPV4_SOURCE,
                    address.as_mut_ptr().cast(),
                    4,
                    BPF_HDR_START_NET,
                )
            },
            4,
        ),
        ETH_P_IPV6 => (
            unsafe {
                bpf_skb_load_bytes_relative(
                    ctx.as_ptr(),
                    IPV6_SOURCE,
                    address.as_mut_ptr().cast(),
                    16,
                    BPF_HDR_START_NET,
                )
            },
            16,
        ),
        _ => return SK_PASS,
    };
    if loaded != 0 {
        return SK_PASS;
    }
    // A failed selection (a loop whose socket is gone) falls back to the kernel's hash.
    let _ = SOCKETS.select_reuseport(&ctx, owner(&address, address_len, port, loops));
    SK_PASS
}

relay_common::ebpf_binary!(
    "relay-ebpf's rampart-steer is a reuseport program: rampart-xdp's build script builds it \
     for bpfel-unknown-none and embeds it in the agent; this host binary does nothing"
);
