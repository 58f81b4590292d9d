//! TURN ChannelData messages (RFC 8656 §12.4) and the framing of STUN / ChannelData over
//! stream transports (RFC 8656 §12.5, RFC 8489 §6.2.2).

use crate::stun::MAGIC_COOKIE;

pub const CHANNEL_MIN: u16 = 0x4000;
/// RFC 8656 §12 narrowed channel numbers to 0x4000-0x4FFF, reserving 0x5000-0x7FFF so that a
/// *client* can demultiplex them from DTLS-SRTP (RFC 7983). RFC 5766 clients, still the most
/// deployed (coturn's own among them), pick from the whole 0x4000-0x7FFF; the server accepts
/// that range because its sockets carry nothing but STUN and ChannelData, so no ambiguity
/// arises on its side.
pub const CHANNEL_MAX: u16 = 0x7FFF;
/// Largest frame [`next_stream_frame`] can report: a STUN header plus a 16-bit length.
pub const MAX_STREAM_FRAME: usize = 20 + 65535;

const HEADER_LEN: usize = 4;
const STUN_HEADER_LEN: usize = 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChannelData<'a> {
    pub channel: u16,
    pub data: &'a [u8],
}

#[derive(Clone, Copy, Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChannelDataError {
    #[error("shorter than the 4-byte ChannelData header")]
    TooShort,
    #[error("channel number {0:#06x} outside 0x4000..=0x7FFF")]
    BadChannel(u16),
    #[error("length field exceeds the datagram")]
    Truncated,
}

#[derive(Clone, Copy, Debug, thiserror::Error, PartialEq, Eq)]
pub enum FramingError {
    #[error("leading bits {0:#04b} are neither STUN (00) nor ChannelData (01)")]
    UnknownFrame(u8),
    #[error("STUN header with a bad magic cookie or a length not a multiple of 4")]
    BadStunHeader,
}

impl<'a> ChannelData<'a> {
    /// Parses a ChannelData datagram. Bytes after `length` are allowed: UDP senders may pad
    /// (RFC 8656 §12.5).
    pub fn parse(datagram: &'a [u8]) -> Result<Self, ChannelDataError> {
        let Some((&[c0, c1, l0, l1], rest)) = datagram.split_first_chunk::<HEADER_LEN>() else {
            return Err(ChannelDataError::TooShort);
        };
        let channel = u16::from_be_bytes([c0, c1]);
        if !(CHANNEL_MIN..=CHANNEL_MAX).contains(&channel) {
            return Err(ChannelDataError::BadChannel(channel));
        }
        let len = usize::from(u16::from_be_bytes([l0, l1]));
        let data = rest.get(..len).ok_or(ChannelDataError::Truncated)?;
        Ok(ChannelData { channel, data })
    }

    /// Demultiplexing test (RFC 8656 §12, RFC 7983): leading bits 01 and a full header.
    pub fn looks_like_channel_data(buf: &[u8]) -> bool {
        buf.len() >= HEADER_LEN && buf.first().is_some_and(|b| b & 0xC0 == 0x40)
    }
}

/// Header plus data, padded with zeros to a multiple of 4 bytes when `pad` (required over
/// stream transports, RFC 8656 §12.5). `data` longer than 65535 bytes cannot be expressed
/// and is cut to that length; no UDP payload is that long.
pub fn encode_channel_data(channel: u16, data: &[u8], pad: bool) -> Vec<u8> {
    let data = data.get(..usize::from(u16::MAX)).unwrap_or(data);
    let mut out = vec![0; HEADER_LEN + padded(data.len())];
    out[HEADER_LEN..HEADER_LEN + data.len()].copy_from_slice(data);
    let frame = frame_in_place(&mut out, HEADER_LEN, data.len(), channel, pad);
    out.truncate(frame.map_or(0, |f| f.end));
    out
}

/// Frames `buf[start..start + len]` as ChannelData in place: the header goes into the 4 bytes
/// before it and, when `pad` (stream transports, RFC 8656 §12.5), zeros after it up to a
/// multiple of 4. Returns where the frame lies in `buf`; None when `buf` has no room for them
/// or `len` does not fit the 16-bit length.
pub fn frame_in_place(
    buf: &mut [u8],
    start: usize,
    len: usize,
    channel: u16,
    pad: bool,
) -> Option<std::ops::Range<usize>> {
    let length = u16::try_from(len).ok()?;
    let frame_start = start.checked_sub(HEADER_LEN)?;
    let end = start + if pad { padded(len) } else { len };
    let frame = buf.get_mut(frame_start..end)?;
    let (header, rest) = frame.split_at_mut(HEADER_LEN);
    header[..2].copy_from_slice(&channel.to_be_bytes());
    header[2..].copy_from_slice(&length.to_be_bytes());
    rest[len..].fill(0);
    Some(frame_start..end)
}

/// Length of the next complete frame at the start of a stream buffer: a STUN message
/// (20 + length) or a ChannelData message (4 + length rounded up to 4, RFC 8656 §12.5).
/// `Ok(None)` means more bytes are needed; `Err` means the stream is neither, and the
/// connection should be closed. Frames never exceed [`MAX_STREAM_FRAME`].
pub fn next_stream_frame(buf: &[u8]) -> Result<Option<usize>, FramingError> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    let frame = match first >> 6 {
        0b00 => {
            let Some(&[_, _, l0, l1]) = buf.first_chunk::<4>() else {
                return Ok(None);
            };
            let len = usize::from(u16::from_be_bytes([l0, l1]));
            if !len.is_multiple_of(4) {
                return Err(FramingError::BadStunHeader);
            }
            // Check the cookie as soon as it has arrived, so garbage is refused early.
            if let Some(cookie) = buf.get(4..8)
                && cookie != MAGIC_COOKIE.to_be_bytes()
            {
                return Err(FramingError::BadStunHeader);
            }
            STUN_HEADER_LEN + len
        }
        0b01 => {
            // Leading bits 01 are exactly the channel range 0x4000-0x7FFF.
            let Some(&[_, _, l0, l1]) = buf.first_chunk::<HEADER_LEN>() else {
                return Ok(None);
            };
            HEADER_LEN + padded(usize::from(u16::from_be_bytes([l0, l1])))
        }
        bits => return Err(FramingError::UnknownFrame(bits)),
    };
    Ok((buf.len() >= frame).then_some(frame))
}

const fn padded(len: usize) -> usize {
    (len + 3) & !3
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_valid_and_with_trailing_padding() {
        let frame = [0x40, 0x01, 0x00, 0x03, b'a', b'b', b'c', 0x00];
        let parsed = ChannelData::parse(&frame).unwrap();
        assert_eq!(
            parsed,
            ChannelData {
                channel: 0x4001,
                data: b"abc"
            }
        );
        assert_eq!(ChannelData::parse(&frame[..7]).unwrap().data, b"abc");
        let empty = ChannelData::parse(&[0x4F, 0xFF, 0, 0]).unwrap();
        assert_eq!(
            empty,
            ChannelData {
                channel: 0x4FFF,
                data: &[]
            }
        );
    }

    #[test]
    fn parse_rejects_short_truncated_and_bad_channels() {
        assert_eq!(ChannelData::parse(&[]), Err(ChannelDataError::TooShort));
        assert_eq!(
            ChannelData::parse(&[0x40, 0, 0]),
            Err(ChannelDataError::TooShort)
        );
        assert_eq!(
            ChannelData::parse(&[0x40, 0, 0, 4, 1, 2, 3]),
            Err(ChannelDataError::Truncated)
        );
        assert_eq!(
            ChannelData::parse(&[0x40, 0, 0xFF, 0xFF]),
            Err(ChannelDataError::Truncated)
        );
        for channel in [0x0000, 0x3FFF, 0x8000, 0xFFFF] {
            let mut frame = encode_channel_data(channel, b"x", false);
            assert_eq!(
                ChannelData::parse(&frame),
                Err(ChannelDataError::BadChannel(channel))
            );
            frame.truncate(2);
            assert_eq!(ChannelData::parse(&frame), Err(ChannelDataError::TooShort));
        }
    }

    #[test]
    fn looks_like_channel_data_checks_leading_bits() {
        assert!(ChannelData::looks_like_channel_data(&[0x40, 0, 0, 0]));
        assert!(ChannelData::looks_like_channel_data(&[0x7F, 0xFF, 0, 0]));
        assert!(!ChannelData::looks_like_channel_data(&[0x40, 0, 0]));
        assert!(!ChannelData::looks_like_channel_data(&[]));
        for first in [0x00, 0x3F, 0x80, 0xC0, 0xFF] {
            assert!(!ChannelData::looks_like_channel_data(&[first, 0, 0, 0]));
        }
    }

    #[test]
    fn encode_pads_only_when_asked() {
        assert_eq!(
            encode_channel_data(0x4000, b"abc", false),
            [0x40, 0, 0, 3, b'a', b'b', b'c']
        );
        assert_eq!(
            encode_channel_data(0x4000, b"abc", true),
            [0x40, 0, 0, 3, b'a', b'b', b'c', 0]
        );
        for len in 0..=9 {
            let data = vec![0xAA; len];
            let padded_frame = encode_channel_data(0x4123, &data, true);
            assert_eq!(padded_frame.len(), 4 + padded(len));
            assert!(padded_frame.len().is_multiple_of(4));
            assert_eq!(encode_channel_data(0x4123, &data, false).len(), 4 + len);
            let parsed = ChannelData::parse(&padded_frame).unwrap();
            assert_eq!((parsed.channel, parsed.data), (0x4123, data.as_slice()));
        }
    }

    #[test]
    fn encode_caps_oversized_data() {
        let data = vec![1u8; 70_000];
        let frame = encode_channel_data(0x4000, &data, true);
        assert_eq!(frame.len(), 4 + 65536);
        assert_eq!(ChannelData::parse(&frame).unwrap().data.len(), 65535);
    }

    fn stun_binding_request(body: &[u8]) -> Vec<u8> {
        let mut msg = vec![0x00, 0x01];
        msg.extend_from_slice(&u16::try_from(body.len()).unwrap().to_be_bytes());
        msg.extend_from_slice(&MAGIC_COOKIE.to_be_bytes());
        msg.extend_from_slice(&[7; 12]);
        msg.extend_from_slice(body);
        msg
    }

    #[test]
    fn stream_frames_every_prefix() {
        let stun = stun_binding_request(&[0x80, 0x22, 0x00, 0x03, b'a', b'b', b'c', 0]);
        let channel = encode_channel_data(0x4001, b"hello", true);
        for frame in [&stun, &channel] {
            let mut stream = frame.clone();
            stream.extend_from_slice(&[0x40, 0x00]); // start of the next frame
            for cut in 0..frame.len() {
                assert_eq!(next_stream_frame(&stream[..cut]), Ok(None), "cut {cut}");
            }
            for cut in frame.len()..=stream.len() {
                assert_eq!(
                    next_stream_frame(&stream[..cut]),
                    Ok(Some(frame.len())),
                    "cut {cut}"
                );
            }
        }
    }

    #[test]
    fn stream_channel_data_is_rounded_up() {
        // Length 5 occupies 8 bytes of payload on a stream.
        assert_eq!(
            next_stream_frame(&[0x40, 0x00, 0x00, 0x05, 1, 2, 3, 4, 5, 0, 0]),
            Ok(None)
        );
        assert_eq!(
            next_stream_frame(&[0x40, 0x00, 0x00, 0x05, 1, 2, 3, 4, 5, 0, 0, 0]),
            Ok(Some(12))
        );
        assert_eq!(next_stream_frame(&[0x4F, 0xFF, 0x00, 0x00]), Ok(Some(4)));
    }

    #[test]
    fn stream_rejects_garbage() {
        assert_eq!(
            next_stream_frame(&[0x80]),
            Err(FramingError::UnknownFrame(0b10))
        );
        assert_eq!(
            next_stream_frame(&[0xC0, 0, 0, 0]),
            Err(FramingError::UnknownFrame(0b11))
        );
        assert_eq!(next_stream_frame(&[0x50, 0x00]), Ok(None));
        assert_eq!(next_stream_frame(&[0x7F, 0xFF, 0, 0]), Ok(Some(4)));
        assert_eq!(
            next_stream_frame(&[0x00, 0x01, 0x00, 0x05]),
            Err(FramingError::BadStunHeader)
        );
        assert_eq!(
            next_stream_frame(&[0x00, 0x01, 0x00, 0x04, 0x21, 0x12, 0xA4, 0x43]),
            Err(FramingError::BadStunHeader)
        );
        // Cookie not yet complete: wait.
        assert_eq!(
            next_stream_frame(&[0x00, 0x01, 0x00, 0x04, 0x21, 0x12]),
            Ok(None)
        );
    }

    #[test]
    fn stream_frames_are_capped() {
        let mut stun = vec![0x00, 0x01, 0xFF, 0xFC];
        stun.extend_from_slice(&MAGIC_COOKIE.to_be_bytes());
        stun.resize(20 + 0xFFFC, 0);
        assert_eq!(next_stream_frame(&stun), Ok(Some(20 + 0xFFFC)));
        let channel = encode_channel_data(0x4000, &vec![0; 65535], true);
        assert_eq!(next_stream_frame(&channel), Ok(Some(4 + 65536)));
        const { assert!(4 + 65536 <= MAX_STREAM_FRAME && 20 + 0xFFFC <= MAX_STREAM_FRAME) };
    }

    #[test]
    fn stream_never_panics_on_random_bytes() {
        use rand::{Rng, SeedableRng, rngs::StdRng};
        let mut rng = StdRng::seed_from_u64(0xC0FFEE);
        for _ in 0..20_000 {
            let mut buf = vec![0u8; rng.gen_range(0..64)];
            rng.fill(buf.as_mut_slice());
            if let Ok(Some(frame)) = next_stream_frame(&buf) {
                assert!(frame <= buf.len() && frame <= MAX_STREAM_FRAME);
            }
            let _ = ChannelData::parse(&buf);
        }
    }
}
