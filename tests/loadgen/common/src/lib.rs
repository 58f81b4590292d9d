//! What the load generator's eBPF programs (`loadgen-ebpf`) and `rampart-loadgen` share: the
//! stamp every media packet carries, the map names and types, and the pure arithmetic both
//! sides need (sequence accounting, latency buckets), tested here on the host.
//!
//! Three programs in one object:
//! - `loadgen_inject`, run with `BPF_PROG_RUN` in live-frames mode by one thread for both
//!   sending hosts: each run rewrites the whole frame (Ethernet, IPv4, UDP, ChannelData header,
//!   stamp, checksums) for the next direction and flow in turn and redirects it out of that
//!   direction's host veth ([`INJECT_EGRESS_MAP`]), so the frame goes onto the wire;
//! - `loadgen_count`, attached to the receiving hosts' veths: counts stamped frames per flow
//!   and direction ([`FlowStats`]), records their one-way latency ([`latency_bucket`]) and
//!   drops them; everything else (the TURN signalling) is passed;
//! - `loadgen_reflect`, the instrument's own ceiling: attached to the edge's veths instead of a
//!   relay, it bounces stamped frames back to where they came from.
#![no_std]

/// Marks our packets (b"RAML"); anything else is not counted.
pub const MAGIC: u32 = 0x5241_4d4c;

/// The stamp at the start of every media payload (the ChannelData data, or the UDP payload),
/// big-endian: magic (0..4), step (4..8), flow (8..12), direction (12), zero (13..16),
/// sequence number (16..24), send time in ns (24..32).
pub const STAMP_LEN: usize = 32;
pub const STAMP_STEP: usize = 4;
pub const STAMP_FLOW: usize = 8;
pub const STAMP_DIRECTION: usize = 12;
pub const STAMP_SEQ: usize = 16;
pub const STAMP_SENT_NS: usize = 24;

/// Which way a packet travels through the relay (the stamp's direction byte).
pub const TO_PEER: u8 = 0;
pub const TO_CLIENT: u8 = 1;

pub const INJECT_PROGRAM: &str = "loadgen_inject";
pub const COUNT_PROGRAM: &str = "loadgen_count";
pub const REFLECT_PROGRAM: &str = "loadgen_reflect";

/// Array of one [`InjectConfig`].
pub const INJECT_CONFIG_MAP: &str = "LOADGEN_INJECT_CONFIG";
/// Array of [`InjectFlow`], indexed by `flow * 2 + direction`.
pub const INJECT_FLOWS_MAP: &str = "LOADGEN_INJECT_FLOWS";
/// Devmap of the two sending veths, indexed by direction ([`TO_PEER`]: the client's).
pub const INJECT_EGRESS_MAP: &str = "LOADGEN_INJECT_EGRESS";
/// Array of one [`InjectState`].
pub const INJECT_STATE_MAP: &str = "LOADGEN_INJECT_STATE";
/// Devmap hash: an edge interface's index -> the other edge interface.
pub const REFLECT_EGRESS_MAP: &str = "LOADGEN_REFLECT_EGRESS";
/// Array of one [`CountConfig`].
pub const COUNT_CONFIG_MAP: &str = "LOADGEN_COUNT_CONFIG";
/// Array of [`FlowStats`], indexed by `flow * 2 + direction`.
pub const FLOW_STATS_MAP: &str = "LOADGEN_FLOW_STATS";
/// Per-CPU array of `u64`, indexed by [`latency_bucket`].
pub const LATENCY_MAP: &str = "LOADGEN_LATENCY";

/// Flows the maps hold (`max_entries` of the flow maps; the flow stats hold two per flow).
pub const MAX_FLOWS: u32 = 16384;

/// What the injector sends in this step; written by userspace before each run.
///
/// Frames alternate between the directions: frame `n` goes `n % 2` ([`TO_PEER`]: ChannelData
/// from a client, [`TO_CLIENT`]: plain UDP from the peer), to flow `(n / 2) % flows` with
/// sequence number `(n / 2) / flows`, so each flow's numbers are dense. The template is the
/// ChannelData frame, all zero after the headers; a plain UDP frame is 4 bytes shorter.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InjectConfig {
    /// Flows per direction in [`INJECT_FLOWS_MAP`].
    pub flows: u32,
    pub step: u32,
    /// Media payload bytes (the stamp included; ChannelData adds its 4-byte header).
    pub payload_len: u32,
    /// After falling behind, at most this many frames go out back to back to catch up.
    pub burst: u32,
    /// Nanoseconds between frames, both directions together ([`next_send`]); 0: a frame on
    /// every run.
    pub interval_ns: u64,
}

/// Frames of each direction among the first `stamped` (they alternate, [`TO_PEER`] first).
pub const fn per_direction(stamped: u64) -> [u64; 2] {
    [stamped.div_ceil(2), stamped / 2]
}

/// When the frame after one due at `due_ns` is due, given the time `now_ns` it was sent:
/// one interval later, except that a sender that fell more than `burst` frames behind
/// (descheduled, say) catches up with at most `burst` back-to-back frames rather than all it
/// missed, so that no burst overruns a receive ring.
#[inline(always)]
pub fn next_send(due_ns: u64, now_ns: u64, interval_ns: u64, burst: u32) -> u64 {
    // Bounded operands, so a plain multiplication (the eBPF target has no 128-bit one for an
    // overflow check).
    let window = interval_ns.min(1 << 40) * u64::from(burst.min(1 << 16));
    let floor = now_ns.saturating_sub(window);
    due_ns.max(floor) + interval_ns
}

/// One flow's addressing, as the injector writes it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InjectFlow {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    /// IPv4 addresses in network byte order (as on the wire).
    pub src_ip: [u8; 4],
    pub dst_ip: [u8; 4],
    /// Host byte order.
    pub src_port: u16,
    pub dst_port: u16,
    /// The ChannelData channel number (ignored for [`TO_CLIENT`]).
    pub channel: u16,
    pub _pad: [u8; 2],
}

/// The injector's count of frames it stamped this step, and when the next one is due.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InjectState {
    pub stamped: u64,
    /// `bpf_ktime_get_ns` time at which the next frame is due (0: at once).
    pub next_ns: u64,
}

/// Which step the counters count (frames of another step are passed, not counted).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CountConfig {
    pub step: u32,
    /// Flows per direction: stamps naming another flow are counted as foreign.
    pub flows: u32,
}

/// What one flow in one direction delivered in this step.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowStats {
    /// Distinct sequence numbers that arrived (late ones included).
    pub delivered: u64,
    /// One more than the highest sequence number seen.
    pub next_expected: u64,
    /// Arrived below the highest seen (filling a gap).
    pub reordered: u64,
    /// Arrived again (within the last [`WINDOW`] numbers, where they can be told).
    pub duplicates: u64,
    /// Bit `i`: `next_expected - 1 - i` arrived.
    pub window: u64,
}

/// Sequence numbers behind the highest for which a duplicate can be told from a late arrival.
pub const WINDOW: u64 = 64;

impl FlowStats {
    /// Counts the arrival of `seq`.
    #[inline(always)]
    pub fn record(&mut self, seq: u64) {
        if seq >= self.next_expected {
            let advance = seq - self.next_expected + 1;
            self.window = if advance >= WINDOW {
                1
            } else {
                (self.window << advance) | 1
            };
            self.next_expected = seq + 1;
            self.delivered += 1;
            return;
        }
        let behind = self.next_expected - 1 - seq;
        if behind < WINDOW {
            let bit = 1u64 << behind;
            if self.window & bit != 0 {
                self.duplicates += 1;
                return;
            }
            self.window |= bit;
        }
        self.reordered += 1;
        self.delivered += 1;
    }

    /// Of `sent` numbered 0..sent, how many never arrived: the gaps below the highest seen
    /// plus everything after it. `None` when the counts cannot be (more arrived than sent).
    pub fn lost(&self, sent: u64) -> Option<u64> {
        if self.next_expected > sent || self.delivered > self.next_expected {
            return None;
        }
        Some(sent - self.delivered)
    }
}

/// Buckets of the latency histogram: 8 below 8 ns, then 8 per power of two up to 2^64.
pub const LATENCY_BUCKETS: u32 = (64 - 2) * 8;

/// The histogram bucket of a latency of `ns`: exact below 8 ns, then 8 buckets per power of
/// two (at most 12.5% wide).
#[inline(always)]
pub fn latency_bucket(ns: u64) -> u32 {
    if ns < 8 {
        return ns as u32;
    }
    // The highest set bit, found by halving (the eBPF target has no count-leading-zeros).
    let mut msb = 0u32;
    let mut rest = ns;
    let mut shift = 32u32;
    while shift > 0 {
        if rest >> shift != 0 {
            rest >>= shift;
            msb += shift;
        }
        shift /= 2;
    }
    let sub = ((ns >> (msb - 3)) & 7) as u32;
    (msb - 2) * 8 + sub
}

/// The smallest latency in ns that falls in `bucket` (the inverse of [`latency_bucket`]).
pub const fn bucket_floor(bucket: u32) -> u64 {
    if bucket < 8 {
        return bucket as u64;
    }
    let msb = bucket / 8 + 2;
    let sub = (bucket % 8) as u64;
    (8 + sub) << (msb - 3)
}

const _: () = {
    use core::mem::size_of;
    assert!(size_of::<InjectConfig>() == 24);
    assert!(size_of::<InjectFlow>() == 28);
    assert!(size_of::<InjectState>() == 16);
    assert!(size_of::<CountConfig>() == 8);
    assert!(size_of::<FlowStats>() == 40);
};

// SAFETY (all of these): `#[repr(C)]`, integers and byte arrays only, no implicit padding
// (sizes asserted above), every bit pattern valid.
#[cfg(feature = "user")]
mod pod {
    use super::*;
    unsafe impl aya::Pod for InjectConfig {}
    unsafe impl aya::Pod for InjectFlow {}
    unsafe impl aya::Pod for InjectState {}
    unsafe impl aya::Pod for CountConfig {}
    unsafe impl aya::Pod for FlowStats {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_order_arrivals_are_delivered_and_tail_loss_is_lost() {
        let mut stats = FlowStats::default();
        for seq in 0..10 {
            stats.record(seq);
        }
        assert_eq!((stats.delivered, stats.next_expected), (10, 10));
        assert_eq!(stats.lost(10), Some(0));
        assert_eq!(stats.lost(15), Some(5));
        assert_eq!(stats.lost(9), None, "more arrived than was sent");
    }

    #[test]
    fn gaps_late_arrivals_and_duplicates_are_told_apart() {
        let mut stats = FlowStats::default();
        for seq in [0, 1, 4, 2, 2, 4, 0] {
            stats.record(seq);
        }
        // 3 never came; 2 came late; the second 2, the second 4 and the second 0 are
        // duplicates.
        assert_eq!(stats.delivered, 4);
        assert_eq!(stats.reordered, 1);
        assert_eq!(stats.duplicates, 3);
        assert_eq!(stats.lost(5), Some(1));
        // A jump past the window forgets what it can no longer tell.
        stats.record(1000);
        stats.record(3);
        assert_eq!(stats.delivered, 6);
        assert_eq!(stats.lost(1001), Some(995));
    }

    #[test]
    fn pacing_is_even_and_catches_up_in_bounded_bursts() {
        // On time: one interval apart.
        assert_eq!(next_send(1_000, 1_000, 100, 64), 1_100);
        assert_eq!(next_send(1_100, 1_150, 100, 64), 1_200);
        // Behind by a little: every missed frame still goes.
        assert_eq!(next_send(1_000, 3_000, 100, 64), 1_100);
        // Behind by a lot: at most 64 back to back, then on schedule again.
        let mut due = 0;
        let now = 1_000_000;
        let mut sent = 0;
        while due <= now {
            due = next_send(due, now, 100, 64);
            sent += 1;
        }
        assert_eq!(sent, 65);
    }

    #[test]
    fn latency_buckets_are_monotonic_and_invert() {
        let mut last = 0;
        for ns in [
            0u64,
            1,
            7,
            8,
            9,
            15,
            16,
            17,
            1000,
            12_345,
            1 << 40,
            u64::MAX,
        ] {
            let bucket = latency_bucket(ns);
            assert!(bucket >= last, "{ns}");
            assert!(bucket < LATENCY_BUCKETS, "{ns}");
            assert!(bucket_floor(bucket) <= ns, "{ns}");
            if bucket + 1 < LATENCY_BUCKETS {
                assert!(bucket_floor(bucket + 1) > ns, "{ns}");
            }
            last = bucket;
        }
        // At most 12.5% wide.
        assert_eq!(latency_bucket(1000), latency_bucket(1023));
        assert_ne!(latency_bucket(1000), latency_bucket(1100));
    }
}
