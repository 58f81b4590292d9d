//! Rampart's `sk_lookup` program: for a UDP datagram to a relay address that a relay loop
//! holds, the socket the kernel delivers to is that loop's receive socket, not the relay
//! socket bound to the address, so that a loop reads the peer datagrams of all its
//! allocations with one `recvmmsg` instead of one call per relay socket (see
//! `relay_common::gathering`). Everything else (other ports, other protocols, relay
//! addresses no loop holds) is left to the kernel's own lookup.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
#![cfg_attr(not(target_arch = "bpf"), allow(dead_code, unused_imports))]

use aya_ebpf::{
    bindings::sk_action::SK_PASS,
    macros::{map, sk_lookup},
    maps::{Array, HashMap, SockMap},
    programs::SkLookupContext,
};
use relay_common::gathering::{MAX_PORTS, MAX_SOCKETS, PortRange, RelayPort};

#[map(name = "RAMPART_GATHER_SOCKETS")]
static SOCKETS: SockMap = SockMap::with_max_entries(MAX_SOCKETS, 0);

/// Entries come and go with allocations: not preallocated (`BPF_F_NO_PREALLOC`), so an idle
/// edge does not hold memory for every port.
#[map(name = "RAMPART_GATHER_PORTS")]
static PORTS: HashMap<RelayPort, u32> = HashMap::with_max_entries(MAX_PORTS, BPF_F_NO_PREALLOC);

#[map(name = "RAMPART_GATHER_RANGE")]
static RANGE: Array<PortRange> = Array::with_max_entries(1, 0);

const BPF_F_NO_PREALLOC: u32 = 1;
const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
const IPPROTO_UDP: u32 = 17;

#[sk_lookup]
pub fn rampart_gather(ctx: SkLookupContext) -> u32 {
    // SAFETY: the kernel passes a valid `bpf_sk_lookup` context for the program's run.
    let lookup = unsafe { &*ctx.lookup };
    if lookup.protocol != IPPROTO_UDP {
        return SK_PASS;
    }
    let port = lookup.local_port;
    match RANGE.get(0) {
        Some(range) if (range.min..=range.max).contains(&port) => {}
        _ => return SK_PASS,
    }
    let mut key = RelayPort {
        address: [0; 16],
        port: port as u16,
        family: 0,
    };
    // The context's addresses are in network order: their bytes in memory are the address's.
    match lookup.family {
        AF_INET => {
            key.family = 4;
            key.address[..4].copy_from_slice(&lookup.local_ip4.to_ne_bytes());
        }
        AF_INET6 => {
            key.family = 6;
            let mut i = 0;
            while i < 4 {
                key.address[4 * i..4 * i + 4].copy_from_slice(&lookup.local_ip6[i].to_ne_bytes());
                i += 1;
            }
        }
        _ => return SK_PASS,
    }
    // SAFETY: the value is read at once, while the map cannot free it (RCU read side).
    // The key is passed by reference: passed by value, the verifier refuses the program.
    #[allow(clippy::needless_borrows_for_generic_args)]
    let Some(&socket) = (unsafe { PORTS.get(&key) }) else {
        return SK_PASS;
    };
    // A loop whose socket is gone: the relay socket itself receives (the loop watches it too).
    let _ = SOCKETS.redirect_sk_lookup(&ctx, socket, 0);
    SK_PASS
}

relay_common::ebpf_binary!(
    "relay-ebpf's rampart-gather is an sk_lookup program: rampart-xdp's build script builds it \
     for bpfel-unknown-none and embeds it in the agent; this host binary does nothing"
);
