//! Gathering each relay loop's peer datagrams on one receive socket per family: the
//! `rampart-gather` program (`sk_lookup`, attached to this process's network namespace) hands
//! a datagram for a relay address to the receive socket of the loop that holds it (see
//! `relay_common::gathering`). A loop then reads the peers of all its allocations with one
//! `recvmmsg`, where with a readiness poller it makes one call per relay socket that has
//! something, which at many allocations is one call per datagram.
//!
//! Loops register each relay address as they bind it ([`RelayPorts::insert`]) and withdraw it
//! before they close its socket ([`RelayPorts::remove`]); an address not (or no longer) in
//! the map reaches its relay socket as without the program.

use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::os::fd::{AsFd as _, AsRawFd};

use aya::Ebpf;
use aya::maps::{Array, HashMap, Map, MapData, SockMap};
use aya::programs::SkLookup;
pub use relay_common::gathering::socket_index;
use relay_common::gathering::{
    MAX_SOCKETS, PORTS_MAP, PROGRAM_NAME, PortRange, RANGE_MAP, RelayPort, SOCKETS_MAP,
};

use crate::{XdpError, load_embedded, map_error, typed_map, typed_program};

/// The `rampart-gather` object built by `build.rs`; empty with `AYA_BUILD_SKIP=1`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/rampart-gather"));

/// The loaded and attached program. Dropping it detaches it: datagrams go to the relay
/// sockets again.
pub struct Gathering {
    ebpf: Ebpf,
}

/// A loop's receive socket: its place in the map ([`socket_index`]) and the socket, bound and
/// unconnected.
pub struct ReceiveSocket<'a, S> {
    pub index: u32,
    pub socket: &'a S,
}

impl Gathering {
    /// Load the program, put the receive sockets in place, limit it to `ports` and attach it
    /// to this process's network namespace.
    pub fn attach<S: AsRawFd>(
        sockets: &[ReceiveSocket<'_, S>],
        ports: RangeInclusive<u16>,
    ) -> Result<Self, XdpError> {
        let mut ebpf = load_embedded(OBJECT)?;
        let mut receivers: SockMap<_> = typed_map(&mut ebpf, SOCKETS_MAP)?;
        for receiver in sockets {
            if receiver.index >= MAX_SOCKETS {
                return Err(XdpError::Loops(receiver.index as usize / 2 + 1));
            }
            receivers
                .set(receiver.index, receiver.socket, 0)
                .map_err(map_error(SOCKETS_MAP))?;
        }
        let mut range: Array<_, PortRange> = typed_map(&mut ebpf, RANGE_MAP)?;
        let ports = PortRange {
            min: u32::from(*ports.start()),
            max: u32::from(*ports.end()),
        };
        range.set(0, ports, 0).map_err(map_error(RANGE_MAP))?;
        let program: &mut SkLookup = typed_program(&mut ebpf, PROGRAM_NAME)?;
        program
            .load()
            .map_err(|source| XdpError::Verify(PROGRAM_NAME, source))?;
        let namespace = std::fs::File::open("/proc/self/ns/net").map_err(XdpError::Namespace)?;
        program.attach(namespace).map_err(XdpError::Gathering)?;
        Ok(Gathering { ebpf })
    }

    /// A loop's own handle on the relay address map (a file descriptor of its own: loops
    /// update it without sharing anything).
    pub fn relay_ports(&self) -> Result<RelayPorts, XdpError> {
        let Some(Map::HashMap(data)) = self.ebpf.map(PORTS_MAP) else {
            return Err(XdpError::MapMissing(PORTS_MAP));
        };
        let fd = data
            .fd()
            .as_fd()
            .try_clone_to_owned()
            .map_err(XdpError::Namespace)?;
        let data = MapData::from_fd(fd).map_err(map_error(PORTS_MAP))?;
        Ok(RelayPorts {
            map: HashMap::try_from(Map::HashMap(data)).map_err(map_error(PORTS_MAP))?,
        })
    }
}

/// Which loop's receive socket each relay address is gathered on.
pub struct RelayPorts {
    map: HashMap<MapData, RelayPort, u32>,
}

impl RelayPorts {
    /// Gather `relay`'s datagrams on the receive socket at `index`.
    pub fn insert(&mut self, relay: SocketAddr, index: u32) -> Result<(), XdpError> {
        self.map
            .insert(RelayPort::of(relay), index, 0)
            .map_err(map_error(PORTS_MAP))
    }

    /// Let `relay`'s datagrams reach its own socket again.
    pub fn remove(&mut self, relay: SocketAddr) {
        // Absent already (never inserted): nothing to undo.
        let _ = self.map.remove(&RelayPort::of(relay));
    }
}
