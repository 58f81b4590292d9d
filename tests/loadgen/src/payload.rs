//! What each media packet carries so that the receiving side can count it: which step of the
//! run, flow and direction it belongs to, its sequence number in that flow and direction, and
//! when it was sent (both ends are in this process, on one monotonic clock, so the delay is a
//! true one-way latency). The layout is `loadgen_common`'s stamp, which the injector's XDP
//! program writes and the counter reads: both generators' packets look alike.

use loadgen_common::{
    MAGIC, STAMP_DIRECTION, STAMP_FLOW, STAMP_LEN, STAMP_SENT_NS, STAMP_SEQ, STAMP_STEP,
};

/// The header's size; a packet is at least this long.
pub const HEADER: usize = STAMP_LEN;

/// Which way a packet travels through the relay.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Client -> relay (ChannelData) -> peer (plain UDP).
    ToPeer = 0,
    /// Peer -> relay (plain UDP) -> client (ChannelData).
    ToClient = 1,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub step: u32,
    pub flow: u32,
    pub direction: Direction,
    pub seq: u64,
    /// Nanoseconds on the run's clock.
    pub sent_ns: u64,
}

impl Header {
    /// Writes the header at the start of `packet` (at least [`HEADER`] bytes; the rest is
    /// left as it is: padding up to the packet size).
    pub fn write(&self, packet: &mut [u8]) {
        packet[0..4].copy_from_slice(&MAGIC.to_be_bytes());
        packet[STAMP_STEP..STAMP_STEP + 4].copy_from_slice(&self.step.to_be_bytes());
        packet[STAMP_FLOW..STAMP_FLOW + 4].copy_from_slice(&self.flow.to_be_bytes());
        packet[STAMP_DIRECTION..STAMP_SEQ].copy_from_slice(&[self.direction as u8, 0, 0, 0]);
        packet[STAMP_SEQ..STAMP_SEQ + 8].copy_from_slice(&self.seq.to_be_bytes());
        packet[STAMP_SENT_NS..STAMP_SENT_NS + 8].copy_from_slice(&self.sent_ns.to_be_bytes());
    }

    /// The header of a received packet; None for anything that is not one of ours.
    pub fn read(packet: &[u8]) -> Option<Header> {
        let field = |range: std::ops::Range<usize>| packet.get(range);
        let u32_at = |at: usize| {
            field(at..at + 4).map(|b| u32::from_be_bytes(b.try_into().unwrap_or_default()))
        };
        let u64_at = |at: usize| {
            field(at..at + 8).map(|b| u64::from_be_bytes(b.try_into().unwrap_or_default()))
        };
        if u32_at(0)? != MAGIC || packet.len() < HEADER {
            return None;
        }
        let direction = match *packet.get(STAMP_DIRECTION)? {
            0 => Direction::ToPeer,
            1 => Direction::ToClient,
            _ => return None,
        };
        Some(Header {
            step: u32_at(STAMP_STEP)?,
            flow: u32_at(STAMP_FLOW)?,
            direction,
            seq: u64_at(STAMP_SEQ)?,
            sent_ns: u64_at(STAMP_SENT_NS)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip_and_strangers_are_refused() {
        let header = Header {
            step: 3,
            flow: 70_000,
            direction: Direction::ToClient,
            seq: 1 << 40,
            sent_ns: 123_456_789_012,
        };
        let mut packet = vec![0xAA; 160];
        header.write(&mut packet);
        assert_eq!(Header::read(&packet), Some(header));
        assert_eq!(Header::read(&packet[..HEADER]), Some(header));
        assert_eq!(Header::read(&packet[..HEADER - 1]), None);
        packet[0] ^= 1;
        assert_eq!(Header::read(&packet), None);
        packet[0] ^= 1;
        packet[STAMP_DIRECTION] = 2;
        assert_eq!(Header::read(&packet), None);
        assert_eq!(Header::read(&[]), None);
    }
}
