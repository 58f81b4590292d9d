//! Why the program did not forward a frame, and what it then does with it.
//!
//! Every variant maps to exactly one XDP action and one [`Stat`] slot. Everything found before
//! the frame is touched is `XDP_PASS`: the kernel stack delivers the frame unchanged and
//! userspace serves it (or the stack drops it, if it is malformed), so nothing is lost. Two
//! outcomes are `XDP_DROP`: a failure after the rewrite began (a half-rewritten frame must
//! never leave), and a datagram over its allocation's bandwidth limit or the total (userspace
//! would drop it too, after the cost of getting it there, which is what a flood over a limit
//! must not get).

use aya_ebpf::bindings::xdp_action;
use relay_common::Stat;

use crate::maps::count;

/// `repr(u32)`: a `Result<u32, Error>` is then two fully defined 32-bit values. With a
/// smaller discriminant LLVM may leave the rest of the payload undefined and read a register
/// it never wrote on that path, which the verifier rejects (`R3 !read_ok`).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Error {
    /// Not IPv4/IPv6 UDP, or UDP that no binding names.
    NotOurs,
    /// A STUN message: the TURN server's business.
    Stun,
    /// ChannelData on a channel that is not bound for this client 5-tuple.
    UnboundChannel,
    /// The binding's `expires_ns` has passed.
    Expired,
    /// An IPv4 or IPv6 fragment.
    Fragment,
    /// IPv4 options or IPv6 extension headers.
    IpOptions,
    /// A VLAN-tagged frame.
    Vlan,
    /// Truncated or inconsistent headers, a bad IPv4 header checksum, a zero UDP checksum on
    /// IPv6.
    Malformed,
    /// The ChannelData length field does not fit the datagram (RFC 8656 §12).
    ChannelLength,
    /// UDP checksum 0 (IPv4) to be sent over IPv6, which requires one (RFC 8200 §8.1).
    ChecksumZeroV6,
    /// TTL / hop limit exhausted.
    Ttl,
    /// No route, no neighbour, or another FIB lookup failure.
    FibMiss,
    /// The FIB lookup refused because forwarding is off on the ingress interface.
    ForwardingDisabled,
    /// The rewritten datagram is larger than the egress MTU.
    FragNeeded,
    /// The egress interface is not in the devmap.
    NoEgress,
    /// The binding mixes address families.
    BadBinding,
    /// `bpf_xdp_adjust_head` refused before anything was written (no headroom).
    AdjustFailed,
    /// A helper or bounds check failed after the frame was modified.
    AfterRewrite,
    /// Partial (offload) UDP checksum: see `Stat::PassChecksumPartial`.
    ChecksumPartial,
    /// Over the allocation's bandwidth limit.
    OverLimit,
    /// Over this CPU's share of the total bandwidth limit.
    OverTotal,
}

impl Error {
    /// The XDP action for this outcome.
    #[inline(always)]
    pub const fn action(self) -> u32 {
        match self {
            Error::AfterRewrite | Error::OverLimit | Error::OverTotal => xdp_action::XDP_DROP,
            _ => xdp_action::XDP_PASS,
        }
    }

    /// The [`Stat`] slot that counts this outcome.
    #[inline(always)]
    pub const fn stat(self) -> Stat {
        match self {
            Error::NotOurs => Stat::PassNotOurs,
            Error::Stun => Stat::PassStun,
            Error::UnboundChannel => Stat::PassUnboundChannel,
            Error::Expired => Stat::PassExpired,
            Error::Fragment => Stat::PassFragment,
            Error::IpOptions => Stat::PassIpOptions,
            Error::Vlan => Stat::PassVlan,
            Error::Malformed => Stat::PassMalformed,
            Error::ChannelLength => Stat::PassChannelLength,
            Error::ChecksumZeroV6 => Stat::PassChecksumZeroV6,
            Error::Ttl => Stat::PassTtl,
            Error::FibMiss => Stat::PassFibMiss,
            Error::ForwardingDisabled => Stat::PassForwardingDisabled,
            Error::FragNeeded => Stat::PassFragNeeded,
            Error::NoEgress => Stat::PassNoEgress,
            Error::BadBinding => Stat::PassBadBinding,
            Error::AdjustFailed => Stat::PassAdjustFailed,
            Error::AfterRewrite => Stat::DropAfterRewrite,
            Error::ChecksumPartial => Stat::PassChecksumPartial,
            Error::OverLimit => Stat::DropOverLimit,
            Error::OverTotal => Stat::DropOverTotal,
        }
    }
}

/// Counts the outcome of a rewrite for a frame of `frame_len` bytes (as received) and returns
/// its action: `Ok` is the action of a frame sent on (counted in `forwarded`), `Err` why not.
#[inline(always)]
pub fn finish(result: Result<u32, Error>, forwarded: Stat, frame_len: usize) -> u32 {
    match result {
        Ok(action) => {
            count(forwarded, frame_len);
            action
        }
        Err(error) => {
            count(error.stat(), frame_len);
            error.action()
        }
    }
}
