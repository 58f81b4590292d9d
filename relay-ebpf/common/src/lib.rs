//! Types shared by Rampart's XDP program (`relay-ebpf`) and the agent (`relay-user`).
//!
//! Every map key and value is defined here once, `#[repr(C)]` with explicit padding, so the
//! kernel side and the userspace side agree on the layout byte for byte. The `user` feature
//! implements [`aya::Pod`] for the value types so the agent can read and write them.
#![no_std]

/// Name of the XDP program in the object file (the function carrying `#[xdp]`).
pub const PROGRAM_NAME: &str = "rampart_xdp";

/// Name of the per-CPU array of [`Counter`]s, indexed by [`Stat`].
pub const STATS_MAP: &str = "RAMPART_STATS";

/// Slots of [`STATS_MAP`]. The discriminant is the array index.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stat {
    /// Every frame the program was run on, whatever it then did with it.
    Seen = 0,
}

impl Stat {
    /// Every slot, in index order.
    pub const ALL: [Stat; 1] = [Stat::Seen];

    /// Index of this slot in [`STATS_MAP`].
    pub const fn index(self) -> u32 {
        self as u32
    }
}

/// Number of entries of [`STATS_MAP`].
pub const STATS_LEN: u32 = Stat::ALL.len() as u32;

/// One CPU's count of frames and bytes for one [`Stat`]. Userspace sums it over CPUs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    pub packets: u64,
    /// Bytes from the start of the Ethernet header to the end of the frame.
    pub bytes: u64,
}

// The kernel copies map values as raw bytes: no implicit padding is allowed to sneak in.
const _: () = assert!(core::mem::size_of::<Counter>() == 16);

// SAFETY: `Counter` is `#[repr(C)]`, made of integers only, has no padding (asserted above),
// and every bit pattern is a valid value.
#[cfg(feature = "user")]
unsafe impl aya::Pod for Counter {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_indices_are_dense() {
        for (i, stat) in Stat::ALL.iter().enumerate() {
            assert_eq!(stat.index() as usize, i);
        }
        assert_eq!(STATS_LEN as usize, Stat::ALL.len());
    }
}
