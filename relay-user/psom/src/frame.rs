//! The frames of the Web Conferencing Edge (see `docs/psom.md`): a 4-byte header (type,
//! flags, 16-bit big-endian payload length) and the payload. Sans-IO: bytes in, frames out.

/// Header: type (1), flags (1, zero), payload length (2, big-endian).
pub const HEADER_LEN: usize = 4;
/// Identifiers (conference ids, keys, names) are at most this long.
pub const MAX_FIELD: usize = 255;

/// Why a frame cannot be read.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("unknown frame type {0:#04x}")]
    UnknownType(u8),
    #[error("frame flags {0:#04x} are reserved (must be 0)")]
    Flags(u8),
    #[error("malformed {0} frame")]
    Malformed(&'static str),
}

/// Why a join was refused; sent in a Reject frame and counted per reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RejectReason {
    /// No conference with that id is registered.
    UnknownConference = 1,
    /// The session key does not match.
    WrongKey = 2,
    /// The conference has expired.
    Expired = 3,
    /// The conference was revoked.
    Revoked = 4,
    /// The conference does not admit anonymous guests.
    AnonymousNotAllowed = 5,
    /// The conference has its maximum of participants.
    Full = 6,
    /// No internal conferencing server was available in time.
    ServiceUnavailable = 7,
    /// The first frame was not a well-formed Join.
    Malformed = 8,
    /// No Join arrived in time.
    Timeout = 9,
}

impl RejectReason {
    pub const ALL: [RejectReason; 9] = [
        RejectReason::UnknownConference,
        RejectReason::WrongKey,
        RejectReason::Expired,
        RejectReason::Revoked,
        RejectReason::AnonymousNotAllowed,
        RejectReason::Full,
        RejectReason::ServiceUnavailable,
        RejectReason::Malformed,
        RejectReason::Timeout,
    ];

    pub fn code(self) -> u8 {
        self as u8
    }

    pub fn from_code(code: u8) -> Option<RejectReason> {
        RejectReason::ALL.into_iter().find(|r| r.code() == code)
    }

    /// The name used in counters and logs.
    pub fn name(self) -> &'static str {
        match self {
            RejectReason::UnknownConference => "unknown_conference",
            RejectReason::WrongKey => "wrong_key",
            RejectReason::Expired => "expired",
            RejectReason::Revoked => "revoked",
            RejectReason::AnonymousNotAllowed => "anonymous_not_allowed",
            RejectReason::Full => "full",
            RejectReason::ServiceUnavailable => "service_unavailable",
            RejectReason::Malformed => "malformed",
            RejectReason::Timeout => "timeout",
        }
    }

    /// What the client is told.
    pub fn text(self) -> &'static str {
        match self {
            RejectReason::UnknownConference => "no such conference",
            RejectReason::WrongKey => "the conference key is not valid",
            RejectReason::Expired => "the conference has expired",
            RejectReason::Revoked => "the conference has been cancelled",
            RejectReason::AnonymousNotAllowed => "this conference does not admit anonymous guests",
            RejectReason::Full => "the conference is full",
            RejectReason::ServiceUnavailable => {
                "the conferencing service is unavailable; try again later"
            }
            RejectReason::Malformed => "the first frame must be a well-formed join request",
            RejectReason::Timeout => "no join request in time",
        }
    }
}

/// A client's request to join, its first frame on the external leg.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Join {
    pub conference_id: String,
    pub key: Vec<u8>,
    /// A guest who did not sign in.
    pub anonymous: bool,
    pub display_name: String,
}

/// What the edge tells the internal server about the participant it hands over.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Assign {
    pub conference_id: String,
    pub anonymous: bool,
    pub display_name: String,
    /// The participant's address as the edge sees it.
    pub client: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    /// Client -> edge: the first frame.
    Join(Join),
    /// Edge -> client: admitted; bytes are relayed from now on.
    Accept,
    /// Edge -> client: refused, then the connection closes.
    Reject { reason: RejectReason, text: String },
    /// Internal server -> edge, first frame on the internal leg: who is there.
    Hello { server: String },
    /// Edge -> internal server: open this many more idle connections.
    Need { connections: u16 },
    /// Edge -> internal server: this connection now carries a participant; raw bytes follow.
    Assign(Assign),
}

const JOIN: u8 = 0x01;
const ACCEPT: u8 = 0x02;
const REJECT: u8 = 0x03;
const HELLO: u8 = 0x10;
const NEED: u8 = 0x11;
const ASSIGN: u8 = 0x12;

impl Frame {
    pub fn encode(&self) -> Vec<u8> {
        let mut payload = Vec::new();
        let kind = match self {
            Frame::Join(join) => {
                put_text(&mut payload, &join.conference_id);
                put_field(&mut payload, &join.key);
                payload.push(u8::from(join.anonymous));
                put_text(&mut payload, &join.display_name);
                JOIN
            }
            Frame::Accept => ACCEPT,
            Frame::Reject { reason, text } => {
                payload.push(reason.code());
                put_text(&mut payload, text);
                REJECT
            }
            Frame::Hello { server } => {
                put_text(&mut payload, server);
                HELLO
            }
            Frame::Need { connections } => {
                payload.extend_from_slice(&connections.to_be_bytes());
                NEED
            }
            Frame::Assign(assign) => {
                put_text(&mut payload, &assign.conference_id);
                payload.push(u8::from(assign.anonymous));
                put_text(&mut payload, &assign.display_name);
                put_text(&mut payload, &assign.client);
                ASSIGN
            }
        };
        let mut frame = Vec::with_capacity(HEADER_LEN + payload.len());
        frame.push(kind);
        frame.push(0);
        // Every field is at most 255 bytes, so a payload is far below 64 KiB.
        frame.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        frame.extend_from_slice(&payload);
        frame
    }

    /// The first frame in `buf` and its length in bytes; `Ok(None)` while incomplete.
    pub fn decode(buf: &[u8]) -> Result<Option<(Frame, usize)>, FrameError> {
        let Some(&[kind, flags, l0, l1]) = buf.first_chunk::<HEADER_LEN>() else {
            return Ok(None);
        };
        if !matches!(kind, JOIN | ACCEPT | REJECT | HELLO | NEED | ASSIGN) {
            return Err(FrameError::UnknownType(kind));
        }
        if flags != 0 {
            return Err(FrameError::Flags(flags));
        }
        let len = usize::from(u16::from_be_bytes([l0, l1]));
        let Some(payload) = buf.get(HEADER_LEN..HEADER_LEN + len) else {
            return Ok(None);
        };
        let mut r = Reader(payload);
        let frame = match kind {
            JOIN => {
                let bad = || FrameError::Malformed("Join");
                let conference_id = r.text().ok_or_else(bad)?;
                let key = r.field().ok_or_else(bad)?.to_vec();
                let anonymous = r.flag().ok_or_else(bad)?;
                let display_name = r.text().ok_or_else(bad)?;
                if conference_id.is_empty() {
                    return Err(bad());
                }
                Frame::Join(Join {
                    conference_id,
                    key,
                    anonymous,
                    display_name,
                })
            }
            ACCEPT => Frame::Accept,
            REJECT => {
                let bad = || FrameError::Malformed("Reject");
                let reason = r.byte().and_then(RejectReason::from_code).ok_or_else(bad)?;
                let text = r.text().ok_or_else(bad)?;
                Frame::Reject { reason, text }
            }
            HELLO => Frame::Hello {
                server: r.text().ok_or(FrameError::Malformed("Hello"))?,
            },
            NEED => {
                let bytes = r.take(2).ok_or(FrameError::Malformed("Need"))?;
                Frame::Need {
                    connections: u16::from_be_bytes([bytes[0], bytes[1]]),
                }
            }
            _ => {
                let bad = || FrameError::Malformed("Assign");
                Frame::Assign(Assign {
                    conference_id: r.text().ok_or_else(bad)?,
                    anonymous: r.flag().ok_or_else(bad)?,
                    display_name: r.text().ok_or_else(bad)?,
                    client: r.text().ok_or_else(bad)?,
                })
            }
        };
        if !r.0.is_empty() {
            return Err(FrameError::Malformed("trailing bytes in a"));
        }
        Ok(Some((frame, HEADER_LEN + len)))
    }
}

/// Text cut at a character boundary so that it stays valid UTF-8.
fn put_text(out: &mut Vec<u8>, text: &str) {
    let mut end = text.len().min(MAX_FIELD);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    put_field(out, &text.as_bytes()[..end]);
}

fn put_field(out: &mut Vec<u8>, bytes: &[u8]) {
    let bytes = &bytes[..bytes.len().min(MAX_FIELD)];
    out.push(bytes.len() as u8);
    out.extend_from_slice(bytes);
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = self.0.split_at_checked(n)?;
        self.0 = rest;
        Some(head)
    }

    fn byte(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }

    fn flag(&mut self) -> Option<bool> {
        match self.byte()? {
            0 => Some(false),
            1 => Some(true),
            _ => None,
        }
    }

    fn field(&mut self) -> Option<&'a [u8]> {
        let len = usize::from(self.byte()?);
        self.take(len)
    }

    /// UTF-8 without control characters (they would end up in logs).
    fn text(&mut self) -> Option<String> {
        let text = std::str::from_utf8(self.field()?).ok()?;
        (!text.chars().any(char::is_control)).then(|| text.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames() -> Vec<Frame> {
        vec![
            Frame::Join(Join {
                conference_id: "weekly".into(),
                key: vec![0, 1, 2, 255],
                anonymous: true,
                display_name: "Guest 1".into(),
            }),
            Frame::Accept,
            Frame::Reject {
                reason: RejectReason::WrongKey,
                text: RejectReason::WrongKey.text().into(),
            },
            Frame::Hello {
                server: "conf-1".into(),
            },
            Frame::Need { connections: 3 },
            Frame::Assign(Assign {
                conference_id: "weekly".into(),
                anonymous: false,
                display_name: "Alice".into(),
                client: "198.51.100.7:50000".into(),
            }),
        ]
    }

    #[test]
    fn frames_round_trip_and_wait_for_their_last_byte() {
        for frame in frames() {
            let bytes = frame.encode();
            assert_eq!(
                Frame::decode(&bytes),
                Ok(Some((frame.clone(), bytes.len())))
            );
            for cut in 0..bytes.len() {
                assert_eq!(
                    Frame::decode(&bytes[..cut]),
                    Ok(None),
                    "{frame:?} cut at {cut}"
                );
            }
            let mut two = bytes.clone();
            two.extend_from_slice(&Frame::Accept.encode());
            assert_eq!(Frame::decode(&two).unwrap().unwrap().1, bytes.len());
        }
    }

    #[test]
    fn malformed_frames_are_refused_without_panicking() {
        assert_eq!(
            Frame::decode(&[0x7f, 0, 0, 0]),
            Err(FrameError::UnknownType(0x7f))
        );
        assert_eq!(Frame::decode(&[JOIN, 1, 0, 0]), Err(FrameError::Flags(1)));
        // A join whose field lengths run past the payload; an empty conference id; a
        // control character in a name; a flag that is not 0 or 1; trailing bytes.
        for payload in [
            vec![10, b'a'],
            vec![0, 0, 0, 0],
            vec![1, b'a', 0, 0, 2, b'x', 0x07],
            vec![1, b'a', 0, 2, 0],
            vec![1, b'a', 0, 0, 0, 9],
        ] {
            let mut frame = vec![JOIN, 0, 0, payload.len() as u8];
            frame.extend_from_slice(&payload);
            assert!(
                matches!(Frame::decode(&frame), Err(FrameError::Malformed(_))),
                "{payload:?}"
            );
        }
        // Arbitrary bytes: an answer or an error, never a panic.
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..20_000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let len = (seed % 40) as usize;
            let bytes: Vec<u8> = (0..len).map(|i| (seed >> (i % 8 * 8)) as u8).collect();
            let _ = Frame::decode(&bytes);
        }
    }

    #[test]
    fn long_fields_are_cut_at_255_bytes() {
        let join = Frame::Join(Join {
            conference_id: "c".repeat(300),
            key: vec![1; 300],
            anonymous: false,
            display_name: String::new(),
        });
        let Some((Frame::Join(decoded), _)) = Frame::decode(&join.encode()).unwrap() else {
            panic!("a join");
        };
        assert_eq!(decoded.conference_id.len(), MAX_FIELD);
        assert_eq!(decoded.key.len(), MAX_FIELD);
    }
}
