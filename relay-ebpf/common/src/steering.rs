//! Which relay loop owns a client: the function the reuseport program (`rampart-steer`) steers
//! every client datagram by, and that the agent computes to know where a client lives. The
//! kernel's own reuseport hash cannot serve: it is keyed with a random per-boot secret (and
//! changes with the group's sockets), so userspace could not compute it.

/// Name of the reuseport program in the `rampart-steer` object.
pub const PROGRAM_NAME: &str = "rampart_steer";
/// Name of its `REUSEPORT_SOCKARRAY`: loop index -> that loop's listening socket.
pub const SOCKETS_MAP: &str = "RAMPART_STEER_SOCKETS";
/// Name of its one-entry array holding the number of loops.
pub const LOOPS_MAP: &str = "RAMPART_STEER_LOOPS";
/// Loops a group can have: the size of [`SOCKETS_MAP`].
pub const MAX_LOOPS: u32 = 256;

const FNV_OFFSET: u32 = 0x811c_9dc5;
const FNV_PRIME: u32 = 0x0100_0193;

/// FNV-1a over the client's address (its `address_len` first bytes: 4 for IPv4, 16 for IPv6,
/// network order) and port (network order), modulo `loops`. Written for the verifier: a fixed
/// trip count, no slice indexing it could not bound.
#[inline(always)]
pub fn owner(address: &[u8; 16], address_len: usize, port: [u8; 2], loops: u32) -> u32 {
    let mut hash = FNV_OFFSET;
    let mut i = 0;
    while i < 16 {
        if i < address_len {
            hash = (hash ^ address[i] as u32).wrapping_mul(FNV_PRIME);
        }
        i += 1;
    }
    hash = (hash ^ port[0] as u32).wrapping_mul(FNV_PRIME);
    hash = (hash ^ port[1] as u32).wrapping_mul(FNV_PRIME);
    if loops == 0 { 0 } else { hash % loops }
}

/// [`owner`] of a client's socket address, as the agent computes it. IPv4-mapped IPv6
/// addresses are not unwrapped: a dual-stack listener's clients are steered by the address
/// the kernel shows the program, which for them is the IPv6 form.
pub fn owner_of(client: core::net::SocketAddr, loops: u32) -> u32 {
    let (address, address_len) = crate::address_bytes(client.ip());
    owner(&address, address_len, client.port().to_be_bytes(), loops)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a_of_the_bytes_and_spread_over_loops() {
        assert_eq!(owner(&[0; 16], 4, [0, 0], 0), 0, "no loops: loop 0");
        let mut counts = [0u32; 4];
        for port in 40000..40400u16 {
            let client = core::net::SocketAddr::from(([192, 0, 2, 7], port));
            counts[owner_of(client, 4) as usize] += 1;
        }
        assert!(counts.iter().all(|n| *n > 60), "spread: {counts:?}");
        let v6: core::net::SocketAddr = "[2001:db8::1]:5000".parse().unwrap();
        assert!(owner_of(v6, 3) < 3);
    }
}
