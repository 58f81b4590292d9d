//! STUN message header, parsing and building (RFC 8489 §5, §6, §14).

use std::net::SocketAddr;

use smallvec::SmallVec;
use subtle::ConstantTimeEq;

use super::attributes::{AddressFamily, Attribute, PasswordAlgorithm, attr_type as t, padded};
use super::integrity::{fingerprint, hmac_sha1, hmac_sha256, long_term_key};

pub const MAGIC_COOKIE: u32 = 0x2112_A442;
/// Attributes walked per message before giving up: bounds the work and memory one datagram
/// can cost. Real TURN messages carry about a dozen.
pub const MAX_ATTRIBUTES: usize = 64;

const HEADER_LEN: usize = 20;
/// Attributes a parsed message holds without a heap allocation: a Send indication's
/// XOR-PEER-ADDRESS, DATA, DONT-FRAGMENT and FINGERPRINT, with room to spare.
const INLINE_ATTRIBUTES: usize = 6;
const ATTR_HEADER_LEN: usize = 4;
const MI_LEN: usize = 20;
const MI_SHA256_LEN: usize = 32;
const FINGERPRINT_LEN: usize = 4;

/// STUN method (RFC 8489 §5, RFC 8656 §17). The wire carries 12 bits; higher bits are
/// dropped when encoding.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Method(pub u16);

impl Method {
    pub const BINDING: Method = Method(0x001);
    pub const ALLOCATE: Method = Method(0x003);
    pub const REFRESH: Method = Method(0x004);
    pub const SEND: Method = Method(0x006);
    pub const DATA: Method = Method(0x007);
    pub const CREATE_PERMISSION: Method = Method(0x008);
    pub const CHANNEL_BIND: Method = Method(0x009);
    /// RFC 6062 §6.1: TCP allocations.
    pub const CONNECT: Method = Method(0x00A);
    pub const CONNECTION_BIND: Method = Method(0x00B);
    pub const CONNECTION_ATTEMPT: Method = Method(0x00C);
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    Request,
    Indication,
    SuccessResponse,
    ErrorResponse,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TransactionId(pub [u8; 12]);

/// Which MESSAGE-INTEGRITY flavour protects a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IntegrityKind {
    Sha1,
    Sha256,
}

#[derive(Clone, Copy, Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseError {
    #[error("shorter than the 20-byte STUN header")]
    TooShort,
    #[error("not a STUN message (leading bits or magic cookie)")]
    NotStun,
    #[error("header length is not a multiple of 4 or does not match the datagram")]
    BadLength,
    #[error("attribute runs past the end of the message")]
    Truncated,
    #[error("more than {MAX_ATTRIBUTES} attributes")]
    TooManyAttributes,
    #[error("malformed value for attribute {kind:#06x}")]
    BadAttribute { kind: u16 },
    #[error("attribute after FINGERPRINT")]
    AttributeAfterFingerprint,
    #[error("FINGERPRINT does not match")]
    BadFingerprint,
}

/// Message type layout of RFC 8489 §5: M11..M7 C1 M6..M4 C0 M3..M0.
fn encode_type(class: Class, method: Method) -> u16 {
    let m = method.0 & 0x0FFF;
    let c = match class {
        Class::Request => 0b00,
        Class::Indication => 0b01,
        Class::SuccessResponse => 0b10,
        Class::ErrorResponse => 0b11,
    };
    ((m & 0x0F80) << 2) | ((m & 0x0070) << 1) | (m & 0x000F) | ((c & 0b10) << 7) | ((c & 0b01) << 4)
}

fn decode_type(message_type: u16) -> (Class, Method) {
    let m =
        (message_type & 0x000F) | ((message_type & 0x00E0) >> 1) | ((message_type & 0x3E00) >> 2);
    let class = match ((message_type >> 7) & 0b10) | ((message_type >> 4) & 0b01) {
        0b00 => Class::Request,
        0b01 => Class::Indication,
        0b10 => Class::SuccessResponse,
        _ => Class::ErrorResponse,
    };
    (class, Method(m))
}

/// Where the integrity attribute that protects the message sits.
#[derive(Clone, Copy, Debug)]
struct IntegrityAt<'a> {
    kind: IntegrityKind,
    /// Offset of the attribute header within the datagram.
    offset: usize,
    value: &'a [u8],
}

/// A decoded, validated STUN message borrowing from its datagram.
#[derive(Clone, Debug)]
pub struct Message<'a> {
    pub class: Class,
    pub method: Method,
    pub transaction_id: TransactionId,
    raw: &'a [u8],
    attributes: SmallVec<[Attribute<'a>; INLINE_ATTRIBUTES]>,
    integrity: Option<IntegrityAt<'a>>,
}

/// How far the RFC 8489 §14.5-14.7 ordering rules have progressed.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Stage {
    Open,
    AfterIntegrity,
    AfterIntegritySha256,
    AfterFingerprint,
}

impl<'a> Message<'a> {
    /// Full decode and validation (RFC 8489 §5, §6.3, §14).
    ///
    /// Attributes following MESSAGE-INTEGRITY are ignored except MESSAGE-INTEGRITY-SHA256
    /// and FINGERPRINT, those following MESSAGE-INTEGRITY-SHA256 except FINGERPRINT; nothing
    /// may follow FINGERPRINT, and a FINGERPRINT present is verified.
    pub fn parse(datagram: &'a [u8]) -> Result<Self, ParseError> {
        let (class, method, transaction_id) = header(datagram)?;
        let declared = match datagram.get(2..4) {
            Some(&[l0, l1]) => usize::from(u16::from_be_bytes([l0, l1])),
            _ => return Err(ParseError::TooShort),
        };
        if !declared.is_multiple_of(4) || Some(declared) != datagram.len().checked_sub(HEADER_LEN) {
            return Err(ParseError::BadLength);
        }

        let mut attributes = SmallVec::new();
        let mut integrity = None;
        let mut stage = Stage::Open;
        let mut offset = HEADER_LEN;
        let mut walked = 0;
        while offset < datagram.len() {
            walked += 1;
            if walked > MAX_ATTRIBUTES {
                return Err(ParseError::TooManyAttributes);
            }
            if stage == Stage::AfterFingerprint {
                return Err(ParseError::AttributeAfterFingerprint);
            }
            let (kind, len) = match datagram.get(offset..offset + ATTR_HEADER_LEN) {
                Some(&[k0, k1, l0, l1]) => (
                    u16::from_be_bytes([k0, k1]),
                    usize::from(u16::from_be_bytes([l0, l1])),
                ),
                _ => return Err(ParseError::Truncated),
            };
            let start = offset + ATTR_HEADER_LEN;
            // The padding counts towards the message length (RFC 8489 §14), so it must fit too.
            if start + padded(len) > datagram.len() {
                return Err(ParseError::Truncated);
            }
            let value = datagram
                .get(start..start + len)
                .ok_or(ParseError::Truncated)?;
            let attr_offset = offset;
            offset = start + padded(len);

            match (kind, stage) {
                (t::FINGERPRINT, _) => {
                    let attribute = Attribute::decode(kind, value, &transaction_id)?;
                    let expected = covered(datagram, attr_offset, FINGERPRINT_LEN)
                        .map(|(ty, len, rest)| fingerprint(&[ty, &len, rest]));
                    if expected.is_none_or(|crc| attribute != Attribute::Fingerprint(crc)) {
                        return Err(ParseError::BadFingerprint);
                    }
                    attributes.push(attribute);
                    stage = Stage::AfterFingerprint;
                }
                (_, Stage::AfterIntegritySha256) => {}
                (t::MESSAGE_INTEGRITY_SHA256, _) => {
                    attributes.push(Attribute::decode(kind, value, &transaction_id)?);
                    integrity = Some(IntegrityAt {
                        kind: IntegrityKind::Sha256,
                        offset: attr_offset,
                        value,
                    });
                    stage = Stage::AfterIntegritySha256;
                }
                (_, Stage::AfterIntegrity) => {}
                (t::MESSAGE_INTEGRITY, _) => {
                    attributes.push(Attribute::decode(kind, value, &transaction_id)?);
                    integrity = Some(IntegrityAt {
                        kind: IntegrityKind::Sha1,
                        offset: attr_offset,
                        value,
                    });
                    stage = Stage::AfterIntegrity;
                }
                _ => attributes.push(Attribute::decode(kind, value, &transaction_id)?),
            }
        }

        Ok(Message {
            class,
            method,
            transaction_id,
            raw: datagram,
            attributes,
            integrity,
        })
    }

    /// Cheap demultiplexing test (RFC 8489 §5, RFC 7983): leading bits 00, magic cookie,
    /// at least a header.
    pub fn looks_like_stun(datagram: &[u8]) -> bool {
        header(datagram).is_ok()
    }

    /// Class, method and transaction ID of a datagram whose header is well-formed even if its
    /// body is not, so a malformed request can still be answered with 400.
    pub fn peek_header(datagram: &[u8]) -> Option<(Class, Method, TransactionId)> {
        header(datagram).ok()
    }

    /// The whole datagram this message was parsed from.
    pub fn as_bytes(&self) -> &'a [u8] {
        self.raw
    }

    /// Attributes in wire order, without those ignored after MESSAGE-INTEGRITY(-SHA256).
    pub fn attributes(&self) -> impl Iterator<Item = &Attribute<'a>> {
        self.attributes.iter()
    }

    /// First attribute of the given type (RFC 8489 §14: later duplicates may be ignored).
    pub fn get(&self, kind: u16) -> Option<&Attribute<'a>> {
        self.attributes.iter().find(|a| a.kind() == kind)
    }

    pub fn has(&self, kind: u16) -> bool {
        self.get(kind).is_some()
    }

    pub fn username(&self) -> Option<&'a str> {
        self.find_map(|a| match a {
            Attribute::Username(v) => Some(*v),
            _ => None,
        })
    }

    pub fn userhash(&self) -> Option<[u8; 32]> {
        self.find_map(|a| match a {
            Attribute::Userhash(v) => Some(*v),
            _ => None,
        })
    }

    pub fn realm(&self) -> Option<&'a str> {
        self.find_map(|a| match a {
            Attribute::Realm(v) => Some(*v),
            _ => None,
        })
    }

    pub fn nonce(&self) -> Option<&'a str> {
        self.find_map(|a| match a {
            Attribute::Nonce(v) => Some(*v),
            _ => None,
        })
    }

    pub fn software(&self) -> Option<&'a str> {
        self.find_map(|a| match a {
            Attribute::Software(v) => Some(*v),
            _ => None,
        })
    }

    pub fn lifetime(&self) -> Option<u32> {
        self.find_map(|a| match a {
            Attribute::Lifetime(v) => Some(*v),
            _ => None,
        })
    }

    pub fn requested_transport(&self) -> Option<u8> {
        self.find_map(|a| match a {
            Attribute::RequestedTransport(v) => Some(*v),
            _ => None,
        })
    }

    pub fn requested_address_family(&self) -> Option<AddressFamily> {
        self.find_map(|a| match a {
            Attribute::RequestedAddressFamily(v) => Some(*v),
            _ => None,
        })
    }

    /// ADDITIONAL-ADDRESS-FAMILY, under its RFC number or its draft one.
    pub fn additional_address_family(&self) -> Option<AddressFamily> {
        self.find_map(|a| match a {
            Attribute::AdditionalAddressFamily(v) | Attribute::LegacyAdditionalAddressFamily(v) => {
                Some(*v)
            }
            _ => None,
        })
    }

    /// Whether ADDITIONAL-ADDRESS-FAMILY came under its draft number (0x8032).
    pub fn has_legacy_additional_address_family(&self) -> bool {
        self.attributes
            .iter()
            .any(|a| matches!(a, Attribute::LegacyAdditionalAddressFamily(_)))
    }

    /// `Some(reserve)` when EVEN-PORT is present.
    pub fn even_port(&self) -> Option<bool> {
        self.find_map(|a| match a {
            Attribute::EvenPort { reserve } => Some(*reserve),
            _ => None,
        })
    }

    pub fn reservation_token(&self) -> Option<[u8; 8]> {
        self.find_map(|a| match a {
            Attribute::ReservationToken(v) => Some(*v),
            _ => None,
        })
    }

    pub fn dont_fragment(&self) -> bool {
        self.has(t::DONT_FRAGMENT)
    }

    pub fn channel_number(&self) -> Option<u16> {
        self.find_map(|a| match a {
            Attribute::ChannelNumber(v) => Some(*v),
            _ => None,
        })
    }

    /// RFC 6062 §6.2.1 CONNECTION-ID.
    pub fn connection_id(&self) -> Option<u32> {
        self.find_map(|a| match a {
            Attribute::ConnectionId(v) => Some(*v),
            _ => None,
        })
    }

    pub fn data(&self) -> Option<&'a [u8]> {
        self.find_map(|a| match a {
            Attribute::Data(v) => Some(*v),
            _ => None,
        })
    }

    /// `(code, reason)` of ERROR-CODE.
    pub fn error_code(&self) -> Option<(u16, &'a str)> {
        self.find_map(|a| match a {
            Attribute::ErrorCode { code, reason } => Some((*code, *reason)),
            _ => None,
        })
    }

    /// `(algorithm, parameters)` of PASSWORD-ALGORITHM.
    pub fn password_algorithm(&self) -> Option<(u16, &'a [u8])> {
        self.find_map(|a| match a {
            Attribute::PasswordAlgorithm(algorithm, params) => Some((*algorithm, *params)),
            _ => None,
        })
    }

    /// The PASSWORD-ALGORITHMS list, to check it against the one the server sent
    /// (RFC 8489 §9.2.4 bid-down protection).
    pub fn password_algorithms(&self) -> Option<&[(u16, &'a [u8])]> {
        self.attributes.iter().find_map(|a| match a {
            Attribute::PasswordAlgorithms(list) => Some(list.as_slice()),
            _ => None,
        })
    }

    pub fn xor_mapped_address(&self) -> Option<SocketAddr> {
        self.find_map(|a| match a {
            Attribute::XorMappedAddress(v) => Some(*v),
            _ => None,
        })
    }

    /// All XOR-RELAYED-ADDRESS values: a dual allocation carries two (RFC 8656 §7.3).
    pub fn xor_relayed_addresses(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        self.attributes.iter().filter_map(|a| match a {
            Attribute::XorRelayedAddress(v) => Some(*v),
            _ => None,
        })
    }

    /// All XOR-PEER-ADDRESS values: CreatePermission may carry several (RFC 8656 §9.1).
    pub fn xor_peer_addresses(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        self.attributes.iter().filter_map(|a| match a {
            Attribute::XorPeerAddress(v) => Some(*v),
            _ => None,
        })
    }

    /// Comprehension-required types (0x0000-0x7FFF) this codec does not know, deduplicated,
    /// for a 420 response's UNKNOWN-ATTRIBUTES (RFC 8489 §6.3.1.1).
    pub fn unknown_comprehension_required(&self) -> Vec<u16> {
        let mut unknown = Vec::new();
        for attribute in &self.attributes {
            if let Attribute::Unknown { kind, .. } = attribute
                && *kind < 0x8000
                && !unknown.contains(kind)
            {
                unknown.push(*kind);
            }
        }
        unknown
    }

    /// Either MESSAGE-INTEGRITY or MESSAGE-INTEGRITY-SHA256 is present.
    pub fn has_message_integrity(&self) -> bool {
        self.integrity.is_some()
    }

    /// The strongest integrity attribute present.
    pub fn integrity_kind(&self) -> Option<IntegrityKind> {
        self.integrity.map(|i| i.kind)
    }

    /// Checks MESSAGE-INTEGRITY-SHA256 if present, else MESSAGE-INTEGRITY (RFC 8489 §14.5,
    /// §14.6): the HMAC covers the message up to the attribute with the header length
    /// rewritten to end just after it. The comparison is constant-time.
    pub fn verify_integrity(&self, key: &[u8]) -> bool {
        let Some(at) = self.integrity else {
            return false;
        };
        let Some((type_field, length, rest)) = covered(self.raw, at.offset, at.value.len()) else {
            return false;
        };
        let parts: [&[u8]; 3] = [type_field, &length, rest];
        match at.kind {
            IntegrityKind::Sha1 => hmac_sha1(key, &parts).as_slice().ct_eq(at.value).into(),
            IntegrityKind::Sha256 => hmac_sha256(key, &parts)
                .get(..at.value.len())
                .is_some_and(|expected| expected.ct_eq(at.value).into()),
        }
    }

    fn find_map<T>(&self, f: impl FnMut(&Attribute<'a>) -> Option<T>) -> Option<T> {
        self.attributes.iter().find_map(f)
    }
}

/// What MESSAGE-INTEGRITY(-SHA256) and FINGERPRINT cover (RFC 8489 §14.5-14.7): the message
/// before the attribute at `offset`, with the header length rewritten to end just after that
/// attribute's `value_len`-byte value. Returned as message type, length, and the rest.
fn covered(raw: &[u8], offset: usize, value_len: usize) -> Option<(&[u8], [u8; 2], &[u8])> {
    let body = offset.checked_sub(HEADER_LEN)? + ATTR_HEADER_LEN + value_len;
    let length = u16::try_from(body).ok()?.to_be_bytes();
    Some((raw.get(..2)?, length, raw.get(4..offset)?))
}

/// RFC 8489 §5 / RFC 7983: leading bits 00, magic cookie, at least a header.
fn header(datagram: &[u8]) -> Result<(Class, Method, TransactionId), ParseError> {
    let Some((head, _)) = datagram.split_first_chunk::<HEADER_LEN>() else {
        return Err(ParseError::TooShort);
    };
    let (type_and_len, rest) = head.split_at(4);
    let (cookie, tid) = rest.split_at(4);
    let message_type = match *type_and_len {
        [b0, b1, _, _] if b0 & 0xC0 == 0 => u16::from_be_bytes([b0, b1]),
        _ => return Err(ParseError::NotStun),
    };
    if cookie != MAGIC_COOKIE.to_be_bytes() {
        return Err(ParseError::NotStun);
    }
    let tid = TransactionId(tid.try_into().map_err(|_| ParseError::TooShort)?);
    let (class, method) = decode_type(message_type);
    Ok((class, method, tid))
}

/// Encodes one STUN message. Attributes are written in call order with zero padding;
/// XOR'd addresses use the builder's transaction ID.
#[derive(Clone, Debug)]
pub struct MessageBuilder {
    buf: Vec<u8>,
    transaction_id: TransactionId,
    overflowed: bool,
}

impl MessageBuilder {
    pub fn new(class: Class, method: Method, transaction_id: TransactionId) -> Self {
        let mut builder = MessageBuilder {
            buf: Vec::with_capacity(128),
            transaction_id,
            overflowed: false,
        };
        builder.reset(class, method, transaction_id);
        builder
    }

    /// Starts a new message in the same buffer: a builder kept across messages allocates
    /// nothing once its buffer has grown to their size.
    pub fn reset(&mut self, class: Class, method: Method, transaction_id: TransactionId) {
        self.buf.clear();
        self.buf
            .extend_from_slice(&encode_type(class, method).to_be_bytes());
        self.buf.extend_from_slice(&[0, 0]);
        self.buf.extend_from_slice(&MAGIC_COOKIE.to_be_bytes());
        self.buf.extend_from_slice(&transaction_id.0);
        self.transaction_id = transaction_id;
        self.overflowed = false;
    }

    /// Ends the message with a DATA attribute whose value is already in place at
    /// `buf[start..start + len]`: the message so far and DATA's header are written into the
    /// bytes before it, the padding after it. Returns where the whole message lies in `buf`;
    /// None when `buf` has no room for them or the message would be too long for STUN.
    pub fn frame_around_data(
        &mut self,
        buf: &mut [u8],
        start: usize,
        len: usize,
    ) -> Option<std::ops::Range<usize>> {
        let value_len = u16::try_from(len).ok()?;
        let body_len = self.buf.len() - HEADER_LEN + ATTR_HEADER_LEN + padded(len);
        self.set_length(body_len);
        if self.overflowed || body_len > usize::from(u16::MAX) {
            return None;
        }
        let header_start = start.checked_sub(ATTR_HEADER_LEN)?;
        let message_start = header_start.checked_sub(self.buf.len())?;
        let end = start + padded(len);
        let frame = buf.get_mut(message_start..end)?;
        let (prefix, rest) = frame.split_at_mut(self.buf.len());
        prefix.copy_from_slice(&self.buf);
        let (data_header, value) = rest.split_at_mut(ATTR_HEADER_LEN);
        data_header[..2].copy_from_slice(&t::DATA.to_be_bytes());
        data_header[2..].copy_from_slice(&value_len.to_be_bytes());
        value[len..].fill(0);
        Some(message_start..end)
    }

    /// Appends an attribute. One that would push a length past its 16-bit field (e.g. a DATA
    /// value near 64 KiB) is left out and [`MessageBuilder::overflowed`] turns true.
    pub fn add(&mut self, attribute: &Attribute<'_>) -> &mut Self {
        let start = self.buf.len();
        self.buf.extend_from_slice(&attribute.kind().to_be_bytes());
        self.buf.extend_from_slice(&[0, 0]);
        let fits = attribute.encode_value(&self.transaction_id, &mut self.buf);
        let value_len = self.buf.len() - start - ATTR_HEADER_LEN;
        let new_len = start + ATTR_HEADER_LEN + padded(value_len);
        match (fits, u16::try_from(value_len)) {
            (true, Ok(len)) if new_len - HEADER_LEN <= usize::from(u16::MAX) => {
                if let Some(field) = self.buf.get_mut(start + 2..start + 4) {
                    field.copy_from_slice(&len.to_be_bytes());
                }
                self.buf.resize(new_len, 0);
                self.set_length(new_len - HEADER_LEN);
            }
            _ => {
                self.buf.truncate(start);
                self.overflowed = true;
            }
        }
        self
    }

    /// MESSAGE-INTEGRITY (RFC 8489 §14.5): HMAC-SHA1 over the message so far, with the header
    /// length already counting this attribute.
    pub fn add_message_integrity(&mut self, key: &[u8]) -> &mut Self {
        let mac = self
            .mac_input(MI_LEN)
            .map(|(t, l, rest)| hmac_sha1(key, &[t, &l, rest]));
        if let Some(mac) = mac {
            self.add(&Attribute::MessageIntegrity(mac));
        }
        self
    }

    /// MESSAGE-INTEGRITY-SHA256 (RFC 8489 §14.6), untruncated.
    pub fn add_message_integrity_sha256(&mut self, key: &[u8]) -> &mut Self {
        let mac = self
            .mac_input(MI_SHA256_LEN)
            .map(|(t, l, rest)| hmac_sha256(key, &[t, &l, rest]));
        if let Some(mac) = mac {
            self.add(&Attribute::MessageIntegritySha256(&mac));
        }
        self
    }

    /// USERNAME, REALM, NONCE and MESSAGE-INTEGRITY with the MD5 long-term key (RFC 8489
    /// §9.2.3): what a client adds to sign a request after its challenge.
    pub fn sign_long_term(
        &mut self,
        username: &str,
        realm: &str,
        nonce: &str,
        password: &str,
    ) -> &mut Self {
        self.add(&Attribute::Username(username))
            .add(&Attribute::Realm(realm))
            .add(&Attribute::Nonce(nonce));
        let key = long_term_key(username, realm, password, PasswordAlgorithm::Md5);
        self.add_message_integrity(&key)
    }

    /// FINGERPRINT (RFC 8489 §14.7): CRC-32 of the message so far XOR 0x5354554E, with the
    /// header length already counting this attribute. Must be added last.
    pub fn add_fingerprint(&mut self) -> &mut Self {
        let crc = self
            .mac_input(FINGERPRINT_LEN)
            .map(|(t, l, rest)| fingerprint(&[t, &l, rest]));
        if let Some(crc) = crc {
            self.add(&Attribute::Fingerprint(crc));
        }
        self
    }

    /// True when an attribute was left out because it would not fit (see [`MessageBuilder::add`]).
    pub fn overflowed(&self) -> bool {
        self.overflowed
    }

    pub fn finish(self) -> Vec<u8> {
        self.buf
    }

    fn set_length(&mut self, body_len: usize) {
        if let (Some(field), Ok(len)) = (self.buf.get_mut(2..4), u16::try_from(body_len)) {
            field.copy_from_slice(&len.to_be_bytes());
        }
    }

    /// Message type, the length the header will have once an attribute with a `value_len`
    /// value is appended, and the bytes after the length field. `None` (and `overflowed`)
    /// when that length would not fit.
    fn mac_input(&mut self, value_len: usize) -> Option<(&[u8], [u8; 2], &[u8])> {
        let input = covered(&self.buf, self.buf.len(), value_len);
        self.overflowed |= input.is_none();
        input
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    use rand::{Rng, SeedableRng, rngs::StdRng};

    use super::*;
    use crate::stun::attributes::PasswordAlgorithm;
    use crate::stun::hex;
    use crate::stun::integrity::{long_term_key, short_term_key};

    // RFC 5769 §2.1-2.3 share these parameters.
    const TID_5769: TransactionId = TransactionId([
        0xb7, 0xe7, 0xa7, 0x01, 0xbc, 0x34, 0xd6, 0x86, 0xfa, 0x87, 0xdf, 0xae,
    ]);
    const PASSWORD_5769: &str = "VOkJxbRl1RmTxUk/WvJxBt";
    // RFC 5769 §2.4 and RFC 8489 Appendix B.1.
    const TID_LONG_TERM: TransactionId = TransactionId([
        0x78, 0xad, 0x34, 0x33, 0xc6, 0xad, 0x72, 0xc0, 0x29, 0xda, 0x41, 0x2e,
    ]);
    const USER: &str = "\u{30DE}\u{30C8}\u{30EA}\u{30C3}\u{30AF}\u{30B9}";
    const REALM: &str = "example.org";
    const PASSWORD_LONG_TERM: &str = "TheMatrIX";

    /// RFC 5769 §2.1 Sample Request.
    fn sample_request() -> Vec<u8> {
        hex("0001 0058 2112a442 b7e7a701 bc34d686 fa87dfae
             8022 0010 5354554e 20746573 7420636c 69656e74
             0024 0004 6e0001ff
             8029 0008 932ff9b1 51263b36
             0006 0009 6576746a 3a683676 59202020
             0008 0014 9aeaa70c bfd8cb56 781ef2b5 b2d3f249 c1b571a2
             8028 0004 e57a3bcf")
    }

    /// RFC 5769 §2.2 Sample IPv4 Response.
    fn sample_ipv4_response() -> Vec<u8> {
        hex("0101 003c 2112a442 b7e7a701 bc34d686 fa87dfae
             8022 000b 74657374 20766563 746f7220
             0020 0008 0001a147 e112a643
             0008 0014 2b91f599 fd9e90c3 8c7489f9 2af9ba53 f06be7d7
             8028 0004 c07d4c96")
    }

    /// RFC 5769 §2.3 Sample IPv6 Response.
    fn sample_ipv6_response() -> Vec<u8> {
        hex("0101 0048 2112a442 b7e7a701 bc34d686 fa87dfae
             8022 000b 74657374 20766563 746f7220
             0020 0014 0002a147 0113a9fa a5d3f179 bc25f4b5 bed2b9d9
             0008 0014 a382954e 4be67bf1 1784c97c 8292c275 bfe3ed41
             8028 0004 c8fb0b4c")
    }

    /// RFC 5769 §2.4 Sample Request with Long-Term Authentication.
    fn sample_long_term_request() -> Vec<u8> {
        hex("0001 0060 2112a442 78ad3433 c6ad72c0 29da412e
             0006 0012 e3839ee3 8388e383 aae38383 e382afe3 82b90000
             0015 001c 662f2f34 39396b39 35346436 4f4c3334 6f4c3946 53547679 36347341
             0014 000b 6578616d 706c652e 6f726700
             0008 0014 f6702465 6dd64a3e 02b8e071 2e85c9a2 8ca89666")
    }

    /// RFC 8489 Appendix B.1, as corrected by verified erratum 6268 (header length 0x90,
    /// PASSWORD-ALGORITHM SHA-256 added, MESSAGE-INTEGRITY-SHA256 recomputed).
    fn sample_sha256_request() -> Vec<u8> {
        hex("0001 0090 2112a442 78ad3433 c6ad72c0 29da412e
             001e 0020 4a3cf38f ef6992bd a952c678 0417da0f 24819415 569e60b2 05c46e41 407f1704
             0015 0029 6f624d61 744a6f73 32414141 43662f2f 3439396b 39353464 364f4c33
                       346f4c39 46535476 79363473 41000000
             0014 000b 6578616d 706c652e 6f726700
             001d 0004 00020000
             001c 0020 b5c7bf00 5b6c52a2 1c51c5e8 92f81924 136296cb 927c4314 9309278c c6518e65")
    }

    fn all_vectors() -> Vec<Vec<u8>> {
        vec![
            sample_request(),
            sample_ipv4_response(),
            sample_ipv6_response(),
            sample_long_term_request(),
            sample_sha256_request(),
        ]
    }

    fn long_term_md5() -> Vec<u8> {
        long_term_key(USER, REALM, PASSWORD_LONG_TERM, PasswordAlgorithm::Md5)
    }

    fn long_term_sha256() -> Vec<u8> {
        long_term_key(USER, REALM, PASSWORD_LONG_TERM, PasswordAlgorithm::Sha256)
    }

    fn parse_attrs(datagram: &[u8]) -> Vec<Attribute<'_>> {
        Message::parse(datagram)
            .unwrap()
            .attributes()
            .cloned()
            .collect()
    }

    /// Recomputes a trailing FINGERPRINT so a deliberately altered message still parses.
    fn refingerprint(datagram: &mut [u8]) {
        let at = datagram.len() - 8;
        let crc = fingerprint(&[&datagram[..at]]);
        datagram[at + 4..].copy_from_slice(&crc.to_be_bytes());
    }

    /// The RFC 5769 vectors pad with spaces where the builder pads with zeros: check that
    /// padding bytes are the only difference, then adopt the vector's padding so the
    /// integrity and fingerprint computed next can be compared byte for byte.
    fn adopt_vector_padding(builder: &mut MessageBuilder, vector: &[u8]) {
        let mut padding = Vec::new();
        let mut offset = HEADER_LEN;
        while offset < builder.buf.len() {
            let len = usize::from(u16::from_be_bytes([
                builder.buf[offset + 2],
                builder.buf[offset + 3],
            ]));
            let start = offset + ATTR_HEADER_LEN;
            padding.extend(start + len..start + padded(len));
            offset = start + padded(len);
        }
        for (i, (built, expected)) in builder.buf.iter_mut().zip(vector).enumerate() {
            if (2..4).contains(&i) {
                continue; // length grows as attributes are appended
            }
            if padding.contains(&i) {
                *built = *expected;
            }
            assert_eq!(built, expected, "byte {i}");
        }
    }

    /// Flips one bit of an attribute value and checks integrity no longer verifies.
    fn assert_bit_flip_breaks_integrity(vector: &[u8], at: usize, key: &[u8]) {
        let mut altered = vector.to_vec();
        altered[at] ^= 0x01;
        if Message::parse(vector).unwrap().has(t::FINGERPRINT) {
            assert_eq!(
                Message::parse(&altered).unwrap_err(),
                ParseError::BadFingerprint
            );
            refingerprint(&mut altered);
        }
        let message = Message::parse(&altered).unwrap();
        assert!(!message.verify_integrity(key));
    }

    #[test]
    fn rfc5769_sample_request() {
        let vector = sample_request();
        let message = Message::parse(&vector).unwrap();
        assert_eq!(message.class, Class::Request);
        assert_eq!(message.method, Method::BINDING);
        assert_eq!(message.transaction_id, TID_5769);
        let mac: [u8; 20] = hex("9aeaa70c bfd8cb56 781ef2b5 b2d3f249 c1b571a2")
            .try_into()
            .unwrap();
        assert_eq!(
            parse_attrs(&vector),
            [
                Attribute::Software("STUN test client"),
                Attribute::Priority(0x6e00_01ff),
                Attribute::IceControlled(0x932f_f9b1_5126_3b36),
                Attribute::Username("evtj:h6vY"),
                Attribute::MessageIntegrity(mac),
                Attribute::Fingerprint(0xe57a_3bcf),
            ]
        );
        assert_eq!(message.username(), Some("evtj:h6vY"));
        assert_eq!(message.software(), Some("STUN test client"));
        assert_eq!(message.integrity_kind(), Some(IntegrityKind::Sha1));
        let key = short_term_key(PASSWORD_5769);
        assert!(message.verify_integrity(&key));
        assert!(!message.verify_integrity(b"VOkJxbRl1RmTxUk/WvJxBu"));
        assert!(message.unknown_comprehension_required().is_empty());
        // A bit of the USERNAME, and a bit of the HMAC itself.
        assert_bit_flip_breaks_integrity(&vector, 64, &key);
        assert_bit_flip_breaks_integrity(&vector, 80, &key);

        let mut builder = MessageBuilder::new(Class::Request, Method::BINDING, TID_5769);
        builder
            .add(&Attribute::Software("STUN test client"))
            .add(&Attribute::Priority(0x6e00_01ff))
            .add(&Attribute::IceControlled(0x932f_f9b1_5126_3b36))
            .add(&Attribute::Username("evtj:h6vY"));
        let mut zero_padded = builder.clone();
        adopt_vector_padding(&mut builder, &vector);
        builder.add_message_integrity(&key).add_fingerprint();
        assert_eq!(builder.finish(), vector);

        zero_padded.add_message_integrity(&key).add_fingerprint();
        let reencoded = zero_padded.finish();
        let message = Message::parse(&reencoded).unwrap();
        assert!(message.verify_integrity(&key));
        assert_eq!(message.username(), Some("evtj:h6vY"));
    }

    #[test]
    fn rfc5769_sample_ipv4_response() {
        let vector = sample_ipv4_response();
        let message = Message::parse(&vector).unwrap();
        assert_eq!(message.class, Class::SuccessResponse);
        assert_eq!(message.method, Method::BINDING);
        assert_eq!(message.transaction_id, TID_5769);
        let mapped = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)), 32853);
        let mac: [u8; 20] = hex("2b91f599 fd9e90c3 8c7489f9 2af9ba53 f06be7d7")
            .try_into()
            .unwrap();
        assert_eq!(
            parse_attrs(&vector),
            [
                Attribute::Software("test vector"),
                Attribute::XorMappedAddress(mapped),
                Attribute::MessageIntegrity(mac),
                Attribute::Fingerprint(0xc07d_4c96),
            ]
        );
        assert_eq!(message.xor_mapped_address(), Some(mapped));
        let key = short_term_key(PASSWORD_5769);
        assert!(message.verify_integrity(&key));
        assert_bit_flip_breaks_integrity(&vector, 40, &key);

        let mut builder = MessageBuilder::new(Class::SuccessResponse, Method::BINDING, TID_5769);
        builder
            .add(&Attribute::Software("test vector"))
            .add(&Attribute::XorMappedAddress(mapped));
        adopt_vector_padding(&mut builder, &vector);
        builder.add_message_integrity(&key).add_fingerprint();
        assert_eq!(builder.finish(), vector);
    }

    #[test]
    fn rfc5769_sample_ipv6_response() {
        let vector = sample_ipv6_response();
        let message = Message::parse(&vector).unwrap();
        assert_eq!(message.class, Class::SuccessResponse);
        assert_eq!(message.transaction_id, TID_5769);
        let ip: Ipv6Addr = "2001:db8:1234:5678:11:2233:4455:6677".parse().unwrap();
        let mapped = SocketAddr::new(IpAddr::V6(ip), 32853);
        let mac: [u8; 20] = hex("a382954e 4be67bf1 1784c97c 8292c275 bfe3ed41")
            .try_into()
            .unwrap();
        assert_eq!(
            parse_attrs(&vector),
            [
                Attribute::Software("test vector"),
                Attribute::XorMappedAddress(mapped),
                Attribute::MessageIntegrity(mac),
                Attribute::Fingerprint(0xc8fb_0b4c),
            ]
        );
        let key = short_term_key(PASSWORD_5769);
        assert!(message.verify_integrity(&key));
        assert_bit_flip_breaks_integrity(&vector, 50, &key);

        let mut builder = MessageBuilder::new(Class::SuccessResponse, Method::BINDING, TID_5769);
        builder
            .add(&Attribute::Software("test vector"))
            .add(&Attribute::XorMappedAddress(mapped));
        adopt_vector_padding(&mut builder, &vector);
        builder.add_message_integrity(&key).add_fingerprint();
        assert_eq!(builder.finish(), vector);
    }

    #[test]
    fn rfc5769_sample_long_term_request() {
        let vector = sample_long_term_request();
        let message = Message::parse(&vector).unwrap();
        assert_eq!(message.class, Class::Request);
        assert_eq!(message.method, Method::BINDING);
        assert_eq!(message.transaction_id, TID_LONG_TERM);
        let mac: [u8; 20] = hex("f6702465 6dd64a3e 02b8e071 2e85c9a2 8ca89666")
            .try_into()
            .unwrap();
        assert_eq!(
            parse_attrs(&vector),
            [
                Attribute::Username(USER),
                Attribute::Nonce("f//499k954d6OL34oL9FSTvy64sA"),
                Attribute::Realm(REALM),
                Attribute::MessageIntegrity(mac),
            ]
        );
        assert_eq!(message.realm(), Some(REALM));
        assert_eq!(message.nonce(), Some("f//499k954d6OL34oL9FSTvy64sA"));
        let key = long_term_md5();
        assert!(message.verify_integrity(&key));
        assert!(!message.verify_integrity(&long_term_sha256()));
        assert_bit_flip_breaks_integrity(&vector, 70, &key);

        let mut builder = MessageBuilder::new(Class::Request, Method::BINDING, TID_LONG_TERM);
        builder
            .add(&Attribute::Username(USER))
            .add(&Attribute::Nonce("f//499k954d6OL34oL9FSTvy64sA"))
            .add(&Attribute::Realm(REALM))
            .add_message_integrity(&key);
        assert_eq!(builder.finish(), vector);
    }

    #[test]
    fn rfc8489_b1_sha256_request() {
        let vector = sample_sha256_request();
        let message = Message::parse(&vector).unwrap();
        assert_eq!(message.class, Class::Request);
        assert_eq!(message.method, Method::BINDING);
        assert_eq!(message.transaction_id, TID_LONG_TERM);
        let nonce = "obMatJos2AAACf//499k954d6OL34oL9FSTvy64sA";
        let userhash = crate::stun::userhash(USER, REALM);
        let mac = hex("b5c7bf00 5b6c52a2 1c51c5e8 92f81924 136296cb 927c4314 9309278c c6518e65");
        assert_eq!(
            parse_attrs(&vector),
            [
                Attribute::Userhash(userhash),
                Attribute::Nonce(nonce),
                Attribute::Realm(REALM),
                Attribute::PasswordAlgorithm(PasswordAlgorithm::Sha256.wire(), &[]),
                Attribute::MessageIntegritySha256(&mac),
            ]
        );
        assert_eq!(message.userhash(), Some(userhash));
        assert_eq!(message.username(), None);
        assert_eq!(message.password_algorithm(), Some((0x0002, &[][..])));
        assert_eq!(message.integrity_kind(), Some(IntegrityKind::Sha256));
        let key = long_term_sha256();
        assert!(message.verify_integrity(&key));
        assert!(!message.verify_integrity(&long_term_md5()));
        assert_bit_flip_breaks_integrity(&vector, 60, &key);
        assert_bit_flip_breaks_integrity(&vector, vector.len() - 1, &key);

        let mut builder = MessageBuilder::new(Class::Request, Method::BINDING, TID_LONG_TERM);
        builder
            .add(&Attribute::Userhash(userhash))
            .add(&Attribute::Nonce(nonce))
            .add(&Attribute::Realm(REALM))
            .add(&Attribute::PasswordAlgorithm(
                PasswordAlgorithm::Sha256.wire(),
                &[],
            ))
            .add_message_integrity_sha256(&key);
        assert_eq!(builder.finish(), vector);
    }

    #[test]
    fn truncated_sha256_integrity_verifies() {
        let key = b"secret";
        let mut builder = MessageBuilder::new(Class::Request, Method::ALLOCATE, TID_5769);
        builder.add(&Attribute::RequestedTransport(17));
        let full = builder
            .mac_input(16)
            .map(|(t, l, rest)| hmac_sha256(key, &[t, &l, rest]))
            .unwrap();
        builder
            .add(&Attribute::MessageIntegritySha256(&full[..16]))
            .add_fingerprint();
        let datagram = builder.finish();
        let message = Message::parse(&datagram).unwrap();
        assert!(message.verify_integrity(key));
        assert!(!message.verify_integrity(b"Secret"));
    }

    #[test]
    fn sha256_preferred_when_both_present() {
        let mut builder = MessageBuilder::new(Class::Request, Method::REFRESH, TID_5769);
        builder
            .add(&Attribute::Lifetime(0))
            .add_message_integrity(b"sha1 key")
            .add_message_integrity_sha256(b"sha256 key")
            .add_fingerprint();
        let datagram = builder.finish();
        let message = Message::parse(&datagram).unwrap();
        assert_eq!(message.integrity_kind(), Some(IntegrityKind::Sha256));
        assert!(message.verify_integrity(b"sha256 key"));
        assert!(!message.verify_integrity(b"sha1 key"));
        assert_eq!(message.attributes().count(), 4);
    }

    #[test]
    fn no_integrity_never_verifies() {
        let mut builder = MessageBuilder::new(Class::Request, Method::BINDING, TID_5769);
        builder.add_fingerprint();
        let datagram = builder.finish();
        let message = Message::parse(&datagram).unwrap();
        assert!(!message.has_message_integrity());
        assert_eq!(message.integrity_kind(), None);
        assert!(!message.verify_integrity(b""));
    }

    #[test]
    fn attributes_after_integrity_are_ignored() {
        let key = b"k";
        let mut builder = MessageBuilder::new(Class::Request, Method::ALLOCATE, TID_5769);
        builder
            .add(&Attribute::RequestedTransport(17))
            .add_message_integrity(key);
        builder
            // Malformed address, unknown comprehension-required type, second USERNAME.
            .add(&Attribute::Unknown {
                kind: t::XOR_PEER_ADDRESS,
                value: &[1, 2, 3],
            })
            .add(&Attribute::Unknown {
                kind: 0x7777,
                value: &[],
            })
            .add(&Attribute::Username("late"))
            .add_message_integrity_sha256(key)
            .add(&Attribute::Unknown {
                kind: 0x0008,
                value: &[0; 3],
            })
            .add(&Attribute::Lifetime(5))
            .add_fingerprint();
        let datagram = builder.finish();
        let message = Message::parse(&datagram).unwrap();
        let kinds: Vec<u16> = message.attributes().map(Attribute::kind).collect();
        assert_eq!(
            kinds,
            [
                t::REQUESTED_TRANSPORT,
                t::MESSAGE_INTEGRITY,
                t::MESSAGE_INTEGRITY_SHA256,
                t::FINGERPRINT
            ]
        );
        assert!(message.unknown_comprehension_required().is_empty());
        assert_eq!(message.username(), None);
        assert_eq!(message.lifetime(), None);
        assert!(message.verify_integrity(key));
    }

    #[test]
    fn nothing_may_follow_fingerprint() {
        let mut builder = MessageBuilder::new(Class::Indication, Method::BINDING, TID_5769);
        builder.add_fingerprint().add(&Attribute::Software("x"));
        let datagram = builder.finish();
        assert_eq!(
            Message::parse(&datagram).unwrap_err(),
            ParseError::AttributeAfterFingerprint
        );
    }

    #[test]
    fn bad_fingerprint_rejected() {
        let mut vector = sample_request();
        let last = vector.len() - 1;
        vector[last] ^= 0x80;
        assert_eq!(
            Message::parse(&vector).unwrap_err(),
            ParseError::BadFingerprint
        );
        // A body change without a FINGERPRINT update is caught the same way.
        let mut vector = sample_ipv4_response();
        vector[25] ^= 0x01;
        assert_eq!(
            Message::parse(&vector).unwrap_err(),
            ParseError::BadFingerprint
        );
    }

    #[test]
    fn header_rejections() {
        let vector = sample_request();
        assert_eq!(Message::parse(&[]).unwrap_err(), ParseError::TooShort);
        assert_eq!(
            Message::parse(&vector[..19]).unwrap_err(),
            ParseError::TooShort
        );
        for first in [0x40, 0x80, 0xC0] {
            let mut bad = vector.clone();
            bad[0] |= first;
            assert_eq!(Message::parse(&bad).unwrap_err(), ParseError::NotStun);
            assert!(!Message::looks_like_stun(&bad));
            assert_eq!(Message::peek_header(&bad), None);
        }
        let mut bad_cookie = vector.clone();
        bad_cookie[7] ^= 1;
        assert_eq!(
            Message::parse(&bad_cookie).unwrap_err(),
            ParseError::NotStun
        );
        for length in [0x0000u16, 0x0054, 0x0057, 0x005C, 0x0059, 0xFFFF] {
            let mut bad = vector.clone();
            bad[2..4].copy_from_slice(&length.to_be_bytes());
            assert_eq!(
                Message::parse(&bad).unwrap_err(),
                ParseError::BadLength,
                "{length:#x}"
            );
        }
        let mut trailing = vector.clone();
        trailing.extend_from_slice(&[0; 4]);
        assert_eq!(
            Message::parse(&trailing).unwrap_err(),
            ParseError::BadLength
        );
    }

    #[test]
    fn looks_like_stun_and_peek_header() {
        let vector = sample_long_term_request();
        assert!(Message::looks_like_stun(&vector));
        assert!(Message::looks_like_stun(&vector[..20]));
        assert!(!Message::looks_like_stun(&vector[..19]));
        assert!(!Message::looks_like_stun(&[
            0x40, 0x00, 0x00, 0x04, 1, 2, 3, 4
        ]));
        assert_eq!(
            Message::peek_header(&vector[..20]),
            Some((Class::Request, Method::BINDING, TID_LONG_TERM))
        );
        // Body garbage: the header is still usable for a 400.
        let mut broken = vector.clone();
        broken[20..24].copy_from_slice(&[0x00, 0x20, 0x00, 0x02]);
        assert!(Message::parse(&broken).is_err());
        assert_eq!(
            Message::peek_header(&broken),
            Some((Class::Request, Method::BINDING, TID_LONG_TERM))
        );
    }

    #[test]
    fn message_type_round_trips() {
        let known = [
            (Class::Request, Method::BINDING, 0x0001),
            (Class::SuccessResponse, Method::BINDING, 0x0101),
            (Class::ErrorResponse, Method::BINDING, 0x0111),
            (Class::Request, Method::ALLOCATE, 0x0003),
            (Class::ErrorResponse, Method::ALLOCATE, 0x0113),
            (Class::Request, Method::REFRESH, 0x0004),
            (Class::Indication, Method::SEND, 0x0016),
            (Class::Indication, Method::DATA, 0x0017),
            (Class::SuccessResponse, Method::CREATE_PERMISSION, 0x0108),
            (Class::Request, Method::CHANNEL_BIND, 0x0009),
        ];
        for (class, method, wire) in known {
            assert_eq!(encode_type(class, method), wire);
            assert_eq!(decode_type(wire), (class, method));
        }
        for m in 0..0x1000 {
            for class in [
                Class::Request,
                Class::Indication,
                Class::SuccessResponse,
                Class::ErrorResponse,
            ] {
                let wire = encode_type(class, Method(m));
                assert_eq!(wire & 0xC000, 0);
                assert_eq!(decode_type(wire), (class, Method(m)));
            }
        }
    }

    fn every_attribute<'a>() -> Vec<Attribute<'a>> {
        let v4 = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(203, 0, 113, 7)), 49152);
        let v6 = SocketAddr::new(IpAddr::V6("2001:db8::1".parse().unwrap()), 3478);
        vec![
            Attribute::MappedAddress(v4),
            Attribute::MappedAddress(v6),
            Attribute::XorMappedAddress(v4),
            Attribute::XorMappedAddress(v6),
            Attribute::Username("alice"),
            Attribute::Userhash([0x11; 32]),
            Attribute::ErrorCode {
                code: 438,
                reason: "Stale Nonce",
            },
            Attribute::ErrorCode {
                code: 300,
                reason: "",
            },
            Attribute::ErrorCode {
                code: 699,
                reason: "x",
            },
            Attribute::Realm("rampart"),
            Attribute::Nonce("abcdef"),
            Attribute::PasswordAlgorithms(vec![(1, &[]), (2, &[]), (0x1234, &[9, 8, 7])]),
            Attribute::PasswordAlgorithm(0x1234, &[9, 8, 7, 6, 5]),
            Attribute::UnknownAttributes(vec![0x0031, 0x0032, 0x7FFF]),
            Attribute::Software("rampart 0.1"),
            Attribute::AlternateServer(v6),
            Attribute::AlternateDomain("turn.example.org"),
            Attribute::ChannelNumber(0x4001),
            Attribute::Lifetime(600),
            Attribute::XorPeerAddress(v4),
            Attribute::XorPeerAddress(v6),
            Attribute::Data(b"payload"),
            Attribute::Data(&[]),
            Attribute::XorRelayedAddress(v4),
            Attribute::XorRelayedAddress(v6),
            Attribute::RequestedAddressFamily(AddressFamily::V6),
            Attribute::EvenPort { reserve: true },
            Attribute::EvenPort { reserve: false },
            Attribute::RequestedTransport(17),
            Attribute::DontFragment,
            Attribute::ReservationToken(*b"token-08"),
            Attribute::AdditionalAddressFamily(AddressFamily::V6),
            Attribute::AddressErrorCode {
                family: AddressFamily::V4,
                code: 440,
                reason: "no",
            },
            Attribute::LegacyAddressErrorCode {
                family: AddressFamily::V6,
                code: 440,
                reason: "no",
            },
            Attribute::ConnectionId(0x0102_0304),
            Attribute::Priority(0x6e00_01ff),
            Attribute::UseCandidate,
            Attribute::IceControlled(u64::MAX),
            Attribute::IceControlling(1),
            Attribute::Unknown {
                kind: 0x7001,
                value: &[1, 2, 3, 4, 5],
            },
            Attribute::Unknown {
                kind: 0xC001,
                value: &[],
            },
        ]
    }

    #[test]
    fn every_attribute_round_trips() {
        let tid = TransactionId(*b"rampart-tid!");
        let attributes = every_attribute();
        let mut builder = MessageBuilder::new(Class::Request, Method::ALLOCATE, tid);
        for attribute in &attributes {
            builder.add(attribute);
        }
        builder.add_message_integrity(b"key").add_fingerprint();
        assert!(!builder.overflowed());
        let datagram = builder.finish();
        let message = Message::parse(&datagram).unwrap();
        let decoded: Vec<Attribute> = message.attributes().cloned().collect();
        assert_eq!(decoded[..attributes.len()], attributes[..]);
        assert_eq!(decoded.len(), attributes.len() + 2);
        assert!(message.verify_integrity(b"key"));
        assert_eq!(message.unknown_comprehension_required(), [0x7001]);
        assert_eq!(message.xor_peer_addresses().count(), 2);
        assert_eq!(message.xor_relayed_addresses().count(), 2);
        assert_eq!(message.channel_number(), Some(0x4001));
        assert_eq!(message.lifetime(), Some(600));
        assert_eq!(message.requested_transport(), Some(17));
        assert_eq!(message.data(), Some(&b"payload"[..]));
        assert_eq!(message.error_code(), Some((438, "Stale Nonce")));
        assert_eq!(message.even_port(), Some(true));
        assert_eq!(message.reservation_token(), Some(*b"token-08"));
        assert_eq!(message.requested_address_family(), Some(AddressFamily::V6));
        assert_eq!(message.additional_address_family(), Some(AddressFamily::V6));
        assert!(message.dont_fragment());
        assert_eq!(message.password_algorithms().map(<[_]>::len), Some(3));
        assert_eq!(message.as_bytes(), &datagram[..]);
        assert_eq!(message.get(t::REALM), Some(&Attribute::Realm("rampart")));
    }

    #[test]
    fn builder_pads_with_zeros_and_tracks_length() {
        let mut builder = MessageBuilder::new(Class::Indication, Method::DATA, TID_5769);
        builder.add(&Attribute::Data(b"abcde"));
        let datagram = builder.finish();
        assert_eq!(datagram.len(), 20 + 4 + 8);
        assert_eq!(&datagram[2..4], &[0, 12]);
        assert_eq!(
            &datagram[20..],
            &[
                0x00, 0x13, 0x00, 0x05, b'a', b'b', b'c', b'd', b'e', 0, 0, 0
            ]
        );
    }

    #[test]
    fn builder_refuses_oversized_attributes() {
        let big = vec![0u8; 65_532];
        let mut builder = MessageBuilder::new(Class::Indication, Method::DATA, TID_5769);
        builder.add(&Attribute::Data(&big[..65_528]));
        assert!(!builder.overflowed());
        builder.add(&Attribute::Lifetime(1));
        assert!(builder.overflowed());
        builder.add_fingerprint();
        let datagram = builder.finish();
        assert_eq!(datagram.len(), 20 + 65_532);
        let message = Message::parse(&datagram).unwrap();
        assert_eq!(message.data().map(<[u8]>::len), Some(65_528));

        let mut builder = MessageBuilder::new(Class::Indication, Method::DATA, TID_5769);
        builder
            .add(&Attribute::Data(&[0; 70_000]))
            .add(&Attribute::Lifetime(1));
        assert!(builder.overflowed());
        assert_eq!(parse_attrs(&builder.finish()), [Attribute::Lifetime(1)]);

        let long_params = vec![0u8; 65_536];
        let mut builder = MessageBuilder::new(Class::Request, Method::ALLOCATE, TID_5769);
        builder.add(&Attribute::PasswordAlgorithm(1, &long_params));
        assert!(builder.overflowed());
        assert_eq!(builder.finish().len(), 20);
    }

    fn message_with_attrs(count: usize) -> Vec<u8> {
        let mut builder = MessageBuilder::new(Class::Request, Method::BINDING, TID_5769);
        for _ in 0..count {
            builder.add(&Attribute::Unknown {
                kind: 0x8FFF,
                value: &[],
            });
        }
        builder.finish()
    }

    #[test]
    fn attribute_count_is_limited() {
        assert!(Message::parse(&message_with_attrs(MAX_ATTRIBUTES)).is_ok());
        assert_eq!(
            Message::parse(&message_with_attrs(MAX_ATTRIBUTES + 1)).unwrap_err(),
            ParseError::TooManyAttributes
        );
        assert_eq!(
            Message::parse(&message_with_attrs(1000)).unwrap_err(),
            ParseError::TooManyAttributes
        );
    }

    #[test]
    fn attribute_lengths_past_the_end() {
        for (len, body_len) in [(0xFFFFu16, 4u16), (5, 8), (8, 8), (1, 4), (0xFFFD, 0xFFFC)] {
            let mut datagram = vec![0x00, 0x01];
            datagram.extend_from_slice(&body_len.to_be_bytes());
            datagram.extend_from_slice(&MAGIC_COOKIE.to_be_bytes());
            datagram.extend_from_slice(&TID_5769.0);
            datagram.extend_from_slice(&[0x80, 0x22]);
            datagram.extend_from_slice(&len.to_be_bytes());
            datagram.resize(20 + usize::from(body_len), b'a');
            assert_eq!(
                Message::parse(&datagram).unwrap_err(),
                ParseError::Truncated,
                "{len}"
            );
        }
    }

    #[test]
    fn every_truncation_fails_cleanly() {
        for vector in all_vectors() {
            for cut in 0..vector.len() {
                let prefix = &vector[..cut];
                assert!(Message::parse(prefix).is_err(), "cut {cut}");
                assert_eq!(Message::peek_header(prefix).is_some(), cut >= 20);
            }
        }
    }

    /// Exercises every accessor of a successfully parsed message.
    fn touch(message: &Message<'_>) {
        let _ = (
            message.username(),
            message.realm(),
            message.nonce(),
            message.lifetime(),
        );
        let _ = (
            message.requested_transport(),
            message.channel_number(),
            message.data(),
        );
        let _ = (
            message.error_code(),
            message.password_algorithm(),
            message.even_port(),
        );
        let _ = message.xor_peer_addresses().count() + message.xor_relayed_addresses().count();
        let _ = message.unknown_comprehension_required();
        let _ = message.verify_integrity(b"key");
        for attribute in message.attributes() {
            let mut builder =
                MessageBuilder::new(message.class, message.method, message.transaction_id);
            builder.add(attribute);
            assert!(!builder.overflowed());
        }
    }

    #[test]
    fn every_bit_flip_is_handled() {
        for vector in all_vectors() {
            for bit in 0..vector.len() * 8 {
                let mut altered = vector.clone();
                altered[bit / 8] ^= 1 << (bit % 8);
                if let Ok(message) = Message::parse(&altered) {
                    touch(&message);
                }
            }
        }
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut rng = StdRng::seed_from_u64(0x5354_554E);
        let vectors = all_vectors();
        for _ in 0..20_000 {
            let mut datagram = vec![0u8; rng.gen_range(0..160)];
            rng.fill(datagram.as_mut_slice());
            if let Ok(message) = Message::parse(&datagram) {
                touch(&message);
            }
            let _ = Message::peek_header(&datagram);
        }
        // Valid headers over random TLVs of known types reach every value decoder.
        let kinds: Vec<u16> = every_attribute().iter().map(Attribute::kind).collect();
        for _ in 0..20_000 {
            let mut body = Vec::new();
            for _ in 0..rng.gen_range(0..6) {
                let kind = if rng.gen_bool(0.9) {
                    kinds[rng.gen_range(0..kinds.len())]
                } else {
                    rng.r#gen()
                };
                let len: u16 = rng.gen_range(0..40);
                body.extend_from_slice(&kind.to_be_bytes());
                body.extend_from_slice(&len.to_be_bytes());
                let mut value = vec![0u8; padded(usize::from(len))];
                rng.fill(value.as_mut_slice());
                if rng.gen_bool(0.5) {
                    // Often plausible: small family / class bytes.
                    value.iter_mut().take(4).for_each(|b| *b %= 8);
                }
                body.extend_from_slice(&value);
            }
            let mut datagram = vectors[rng.gen_range(0..vectors.len())][..20].to_vec();
            datagram[2..4].copy_from_slice(&u16::try_from(body.len()).unwrap().to_be_bytes());
            datagram.extend_from_slice(&body);
            if let Ok(message) = Message::parse(&datagram) {
                touch(&message);
            }
        }
    }
}
