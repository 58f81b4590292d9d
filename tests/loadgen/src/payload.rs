//! What each media packet carries so that the receiving side can count it: which step of the
//! run, flow and direction it belongs to, its sequence number in that flow and direction, and
//! when it was sent (both ends are in this process, on one monotonic clock, so the delay is a
//! true one-way latency).

/// Marks our packets; anything else arriving is counted as foreign and ignored.
const MAGIC: u32 = 0x5241_4d4c; // "RAML"

/// The header's size; a packet is at least this long.
pub const HEADER: usize = 4 + 4 + 4 + 1 + 8 + 8;

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
        packet[4..8].copy_from_slice(&self.step.to_be_bytes());
        packet[8..12].copy_from_slice(&self.flow.to_be_bytes());
        packet[12] = self.direction as u8;
        packet[13..21].copy_from_slice(&self.seq.to_be_bytes());
        packet[21..29].copy_from_slice(&self.sent_ns.to_be_bytes());
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
        if u32_at(0)? != MAGIC {
            return None;
        }
        let direction = match *packet.get(12)? {
            0 => Direction::ToPeer,
            1 => Direction::ToClient,
            _ => return None,
        };
        Some(Header {
            step: u32_at(4)?,
            flow: u32_at(8)?,
            direction,
            seq: u64_at(13)?,
            sent_ns: u64_at(21)?,
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
        packet[12] = 2;
        assert_eq!(Header::read(&packet), None);
        assert_eq!(Header::read(&[]), None);
    }
}
