//! Gathering a relay loop's peer datagrams on one socket: the `rampart-gather` program
//! (`BPF_PROG_TYPE_SK_LOOKUP`, attached to the agent's network namespace) looks up the
//! destination of every UDP datagram in [`PORTS_MAP`] and, for a relay address a loop holds,
//! hands the datagram to that loop's receive socket in [`SOCKETS_MAP`] instead of the relay
//! socket bound to the address. The loop reads all its allocations' peer datagrams with one
//! `recvmmsg` and learns each one's relay address from `IP_ORIGDSTADDR`; the relay sockets
//! stay, for sending from the right address.

/// Name of the `sk_lookup` program in the `rampart-gather` object.
pub const PROGRAM_NAME: &str = "rampart_gather";
/// Name of its `SOCKMAP`: [`socket_index`] -> a loop's receive socket for one family.
pub const SOCKETS_MAP: &str = "RAMPART_GATHER_SOCKETS";
/// Name of its hash map [`RelayPort`] -> [`socket_index`] of the loop holding that relay address.
pub const PORTS_MAP: &str = "RAMPART_GATHER_PORTS";
/// Name of its one-entry array holding the relay [`PortRange`]: datagrams to other ports
/// leave the program after one array lookup.
pub const RANGE_MAP: &str = "RAMPART_GATHER_RANGE";
/// Size of [`SOCKETS_MAP`]: an IPv4 and an IPv6 socket for each of up to 256 loops.
pub const MAX_SOCKETS: u32 = 2 * super::steering::MAX_LOOPS;
/// Size of [`PORTS_MAP`]: every port of both families.
pub const MAX_PORTS: u32 = 2 * 65536;

/// A relay address: the IPv4 address in the first 4 bytes of `address` (the rest zero) with
/// `family` 4, or the IPv6 address with `family` 6; `port` in host order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RelayPort {
    pub address: [u8; 16],
    pub port: u16,
    pub family: u16,
}

impl RelayPort {
    pub fn of(relay: core::net::SocketAddr) -> RelayPort {
        let (address, len) = crate::address_bytes(relay.ip());
        RelayPort {
            address,
            port: relay.port(),
            family: if len == 4 { 4 } else { 6 },
        }
    }
}

/// The relay ports (inclusive), host order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortRange {
    pub min: u32,
    pub max: u32,
}

/// Where loop `loop_index`'s receive socket for one family sits in [`SOCKETS_MAP`].
pub const fn socket_index(loop_index: u32, ipv6: bool) -> u32 {
    2 * loop_index + ipv6 as u32
}

const _: () = {
    assert!(size_of::<RelayPort>() == 20 && align_of::<RelayPort>() == 2);
    assert!(size_of::<PortRange>() == 8);
};

// SAFETY: `#[repr(C)]`, integers and byte arrays only, no padding (sizes asserted above),
// every bit pattern valid.
#[cfg(feature = "user")]
mod pod {
    unsafe impl aya::Pod for super::RelayPort {}
    unsafe impl aya::Pod for super::PortRange {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relay_ports_of_both_families() {
        let v4 = RelayPort::of("192.0.2.1:50000".parse().unwrap());
        assert_eq!(v4.address[..4], [192, 0, 2, 1]);
        assert_eq!(v4.address[4..], [0; 12]);
        assert_eq!((v4.port, v4.family), (50000, 4));
        let v6 = RelayPort::of("[2001:db8::1]:50001".parse().unwrap());
        assert_eq!((v6.address[0], v6.address[15], v6.family), (0x20, 1, 6));
        assert_eq!(socket_index(3, true), 7);
    }
}
