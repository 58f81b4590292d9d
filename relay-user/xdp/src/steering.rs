//! Steering client datagrams to the relay loop that owns them: a reuseport group (one socket
//! per loop on the same address, `SO_REUSEPORT`) with the `rampart-steer` program attached,
//! which sends every datagram to the loop [`owner_of`] names for its source. Plain
//! `SO_REUSEPORT` spreads by a kernel hash that userspace cannot compute and that changes as
//! sockets come and go; with this program a client stays on one loop for as long as the group
//! exists, and the agent knows which.
//!
//! Sockets must be bound before they are placed in the group, and the program attached once
//! every loop's socket is in place: until then the kernel spreads by its own hash, so loops
//! still check the owner of what they receive.

use std::os::fd::{AsFd, AsRawFd};

use aya::Ebpf;
use aya::maps::{Array, ReusePortSockArray};
use aya::programs::SkReuseport;
use relay_common::steering::{LOOPS_MAP, PROGRAM_NAME, SOCKETS_MAP};
pub use relay_common::steering::{MAX_LOOPS, owner_of};

use crate::{XdpError, load_embedded, map_error, typed_map, typed_program};

/// The `rampart-steer` object built by `build.rs`; empty with `AYA_BUILD_SKIP=1`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/rampart-steer"));

/// A loaded steering program with its group's sockets in place. Dropping it does not detach the
/// program: the group keeps it until its last socket closes.
pub struct Steering {
    ebpf: Ebpf,
}

impl Steering {
    /// Load the program, put `sockets[i]` (bound, `SO_REUSEPORT`, same address) at loop `i`,
    /// and attach it to their group.
    pub fn attach<S: AsFd + AsRawFd>(sockets: &[S]) -> Result<Self, XdpError> {
        let loops = u32::try_from(sockets.len())
            .ok()
            .filter(|n| (1..=MAX_LOOPS).contains(n))
            .ok_or(XdpError::Loops(sockets.len()))?;
        let mut ebpf = load_embedded(OBJECT)?;
        let mut group: ReusePortSockArray<_> = typed_map(&mut ebpf, SOCKETS_MAP)?;
        for (index, socket) in (0..loops).zip(sockets) {
            group
                .set(index, socket, 0)
                .map_err(map_error(SOCKETS_MAP))?;
        }
        let mut settings: Array<_, u32> = typed_map(&mut ebpf, LOOPS_MAP)?;
        settings.set(0, loops, 0).map_err(map_error(LOOPS_MAP))?;
        let program: &mut SkReuseport = typed_program(&mut ebpf, PROGRAM_NAME)?;
        program
            .load()
            .map_err(|source| XdpError::Verify(PROGRAM_NAME, source))?;
        program.attach(&sockets[0]).map_err(XdpError::Steering)?;
        Ok(Steering { ebpf })
    }

    /// Loops in the group.
    pub fn loops(&self) -> Result<u32, XdpError> {
        let map = self
            .ebpf
            .map(LOOPS_MAP)
            .ok_or(XdpError::MapMissing(LOOPS_MAP))?;
        let settings: Array<_, u32> = Array::try_from(map).map_err(|source| XdpError::Map {
            map: LOOPS_MAP,
            source,
        })?;
        settings.get(&0, 0).map_err(|source| XdpError::Map {
            map: LOOPS_MAP,
            source,
        })
    }
}
