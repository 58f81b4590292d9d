//! STUN attributes: RFC 8489 §14, TURN RFC 8656 §18, ICE RFC 8445 §16.1.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use super::message::{MAGIC_COOKIE, ParseError, TransactionId};

/// Attribute type numbers (IANA "STUN Attributes" registry).
pub mod attr_type {
    pub const MAPPED_ADDRESS: u16 = 0x0001;
    pub const USERNAME: u16 = 0x0006;
    pub const MESSAGE_INTEGRITY: u16 = 0x0008;
    pub const ERROR_CODE: u16 = 0x0009;
    pub const UNKNOWN_ATTRIBUTES: u16 = 0x000A;
    pub const CHANNEL_NUMBER: u16 = 0x000C;
    pub const LIFETIME: u16 = 0x000D;
    pub const XOR_PEER_ADDRESS: u16 = 0x0012;
    pub const DATA: u16 = 0x0013;
    pub const REALM: u16 = 0x0014;
    pub const NONCE: u16 = 0x0015;
    pub const XOR_RELAYED_ADDRESS: u16 = 0x0016;
    pub const REQUESTED_ADDRESS_FAMILY: u16 = 0x0017;
    pub const EVEN_PORT: u16 = 0x0018;
    pub const REQUESTED_TRANSPORT: u16 = 0x0019;
    pub const DONT_FRAGMENT: u16 = 0x001A;
    pub const MESSAGE_INTEGRITY_SHA256: u16 = 0x001C;
    pub const PASSWORD_ALGORITHM: u16 = 0x001D;
    pub const USERHASH: u16 = 0x001E;
    pub const XOR_MAPPED_ADDRESS: u16 = 0x0020;
    pub const RESERVATION_TOKEN: u16 = 0x0022;
    pub const CONNECTION_ID: u16 = 0x002A;
    pub const PRIORITY: u16 = 0x0024;
    pub const USE_CANDIDATE: u16 = 0x0025;
    pub const ADDITIONAL_ADDRESS_FAMILY: u16 = 0x8000;
    /// ADDITIONAL-ADDRESS-FAMILY's number in the drafts before RFC 8656
    /// (draft-ietf-tram-turn-ipv6), which coturn's client still sends for a dual allocation
    /// and coturn's server accepts.
    pub const LEGACY_ADDITIONAL_ADDRESS_FAMILY: u16 = 0x8032;
    pub const ADDRESS_ERROR_CODE: u16 = 0x8001;
    /// ADDRESS-ERROR-CODE's draft number, which coturn used with 0x8032 until 2025 (#1748):
    /// what a client that asked with 0x8032 looks for.
    pub const LEGACY_ADDRESS_ERROR_CODE: u16 = 0x8033;
    pub const PASSWORD_ALGORITHMS: u16 = 0x8002;
    pub const ALTERNATE_DOMAIN: u16 = 0x8003;
    pub const SOFTWARE: u16 = 0x8022;
    pub const ALTERNATE_SERVER: u16 = 0x8023;
    pub const FINGERPRINT: u16 = 0x8028;
    pub const ICE_CONTROLLED: u16 = 0x8029;
    pub const ICE_CONTROLLING: u16 = 0x802A;
}

use attr_type as t;

/// Address family as carried in address attributes and REQUESTED-ADDRESS-FAMILY.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AddressFamily {
    V4,
    V6,
}

impl AddressFamily {
    pub const fn wire(self) -> u8 {
        match self {
            AddressFamily::V4 => 0x01,
            AddressFamily::V6 => 0x02,
        }
    }

    pub const fn from_wire(value: u8) -> Option<Self> {
        match value {
            0x01 => Some(AddressFamily::V4),
            0x02 => Some(AddressFamily::V6),
            _ => None,
        }
    }

    pub const fn of(addr: &SocketAddr) -> Self {
        match addr {
            SocketAddr::V4(_) => AddressFamily::V4,
            SocketAddr::V6(_) => AddressFamily::V6,
        }
    }
}

/// Password algorithms of RFC 8489 §18.5.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PasswordAlgorithm {
    Md5,
    Sha256,
}

impl PasswordAlgorithm {
    pub const fn wire(self) -> u16 {
        match self {
            PasswordAlgorithm::Md5 => 0x0001,
            PasswordAlgorithm::Sha256 => 0x0002,
        }
    }

    pub const fn from_wire(value: u16) -> Option<Self> {
        match value {
            0x0001 => Some(PasswordAlgorithm::Md5),
            0x0002 => Some(PasswordAlgorithm::Sha256),
            _ => None,
        }
    }
}

/// One decoded attribute, borrowing from the datagram.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Attribute<'a> {
    MappedAddress(SocketAddr),
    XorMappedAddress(SocketAddr),
    Username(&'a str),
    Userhash([u8; 32]),
    MessageIntegrity([u8; 20]),
    /// Truncated HMAC-SHA256: 16 to 32 bytes, a multiple of 4 (RFC 8489 §14.6).
    MessageIntegritySha256(&'a [u8]),
    Fingerprint(u32),
    ErrorCode {
        code: u16,
        reason: &'a str,
    },
    Realm(&'a str),
    Nonce(&'a str),
    /// Algorithm number and its parameters, in offered order.
    PasswordAlgorithms(Vec<(u16, &'a [u8])>),
    PasswordAlgorithm(u16, &'a [u8]),
    UnknownAttributes(Vec<u16>),
    Software(&'a str),
    AlternateServer(SocketAddr),
    AlternateDomain(&'a str),
    ChannelNumber(u16),
    Lifetime(u32),
    XorPeerAddress(SocketAddr),
    Data(&'a [u8]),
    XorRelayedAddress(SocketAddr),
    RequestedAddressFamily(AddressFamily),
    EvenPort {
        reserve: bool,
    },
    /// IANA protocol number (17 = UDP).
    RequestedTransport(u8),
    DontFragment,
    ReservationToken([u8; 8]),
    /// RFC 6062 §6.2.1: names one peer data connection of a TCP allocation; opaque to clients.
    ConnectionId(u32),
    AdditionalAddressFamily(AddressFamily),
    /// ADDITIONAL-ADDRESS-FAMILY under its draft number ([`attr_type::LEGACY_ADDITIONAL_ADDRESS_FAMILY`]).
    LegacyAdditionalAddressFamily(AddressFamily),
    AddressErrorCode {
        family: AddressFamily,
        code: u16,
        reason: &'a str,
    },
    /// ADDRESS-ERROR-CODE under its draft number ([`attr_type::LEGACY_ADDRESS_ERROR_CODE`]).
    LegacyAddressErrorCode {
        family: AddressFamily,
        code: u16,
        reason: &'a str,
    },
    Priority(u32),
    UseCandidate,
    IceControlled(u64),
    IceControlling(u64),
    Unknown {
        kind: u16,
        value: &'a [u8],
    },
}

// RFC 8489 §14.3 (RFC 5389 compatible bound; RFC 8489 senders stay under 509).
const USERNAME_MAX_BYTES: usize = 513;
// RFC 8489 §14.8-14.10, §14.14: fewer than 128 characters, up to 763 bytes when decoding.
const TEXT_MAX_BYTES: usize = 763;
const TEXT_MAX_CHARS: usize = 128;
// A DNS name never exceeds 255 octets (RFC 1035 §2.3.4).
const DOMAIN_MAX_BYTES: usize = 256;

impl<'a> Attribute<'a> {
    pub fn kind(&self) -> u16 {
        match self {
            Attribute::MappedAddress(_) => t::MAPPED_ADDRESS,
            Attribute::XorMappedAddress(_) => t::XOR_MAPPED_ADDRESS,
            Attribute::Username(_) => t::USERNAME,
            Attribute::Userhash(_) => t::USERHASH,
            Attribute::MessageIntegrity(_) => t::MESSAGE_INTEGRITY,
            Attribute::MessageIntegritySha256(_) => t::MESSAGE_INTEGRITY_SHA256,
            Attribute::Fingerprint(_) => t::FINGERPRINT,
            Attribute::ErrorCode { .. } => t::ERROR_CODE,
            Attribute::Realm(_) => t::REALM,
            Attribute::Nonce(_) => t::NONCE,
            Attribute::PasswordAlgorithms(_) => t::PASSWORD_ALGORITHMS,
            Attribute::PasswordAlgorithm(..) => t::PASSWORD_ALGORITHM,
            Attribute::UnknownAttributes(_) => t::UNKNOWN_ATTRIBUTES,
            Attribute::Software(_) => t::SOFTWARE,
            Attribute::AlternateServer(_) => t::ALTERNATE_SERVER,
            Attribute::AlternateDomain(_) => t::ALTERNATE_DOMAIN,
            Attribute::ChannelNumber(_) => t::CHANNEL_NUMBER,
            Attribute::Lifetime(_) => t::LIFETIME,
            Attribute::XorPeerAddress(_) => t::XOR_PEER_ADDRESS,
            Attribute::Data(_) => t::DATA,
            Attribute::XorRelayedAddress(_) => t::XOR_RELAYED_ADDRESS,
            Attribute::RequestedAddressFamily(_) => t::REQUESTED_ADDRESS_FAMILY,
            Attribute::EvenPort { .. } => t::EVEN_PORT,
            Attribute::RequestedTransport(_) => t::REQUESTED_TRANSPORT,
            Attribute::DontFragment => t::DONT_FRAGMENT,
            Attribute::ReservationToken(_) => t::RESERVATION_TOKEN,
            Attribute::ConnectionId(_) => t::CONNECTION_ID,
            Attribute::AdditionalAddressFamily(_) => t::ADDITIONAL_ADDRESS_FAMILY,
            Attribute::LegacyAdditionalAddressFamily(_) => t::LEGACY_ADDITIONAL_ADDRESS_FAMILY,
            Attribute::AddressErrorCode { .. } => t::ADDRESS_ERROR_CODE,
            Attribute::LegacyAddressErrorCode { .. } => t::LEGACY_ADDRESS_ERROR_CODE,
            Attribute::Priority(_) => t::PRIORITY,
            Attribute::UseCandidate => t::USE_CANDIDATE,
            Attribute::IceControlled(_) => t::ICE_CONTROLLED,
            Attribute::IceControlling(_) => t::ICE_CONTROLLING,
            Attribute::Unknown { kind, .. } => *kind,
        }
    }

    /// Appends the value (without header or padding). Returns false when a length inside the
    /// value does not fit its 16-bit field.
    pub(crate) fn encode_value(&self, tid: &TransactionId, out: &mut Vec<u8>) -> bool {
        match self {
            Attribute::MappedAddress(addr) | Attribute::AlternateServer(addr) => {
                encode_address(*addr, None, out)
            }
            Attribute::XorMappedAddress(addr)
            | Attribute::XorPeerAddress(addr)
            | Attribute::XorRelayedAddress(addr) => encode_address(*addr, Some(tid), out),
            Attribute::Username(s)
            | Attribute::Realm(s)
            | Attribute::Nonce(s)
            | Attribute::Software(s)
            | Attribute::AlternateDomain(s) => out.extend_from_slice(s.as_bytes()),
            Attribute::Userhash(hash) => out.extend_from_slice(hash),
            Attribute::MessageIntegrity(mac) => out.extend_from_slice(mac),
            Attribute::MessageIntegritySha256(mac) | Attribute::Data(mac) => {
                out.extend_from_slice(mac)
            }
            Attribute::Fingerprint(crc) => out.extend_from_slice(&crc.to_be_bytes()),
            Attribute::ErrorCode { code, reason } => encode_error_code(0, *code, reason, out),
            Attribute::AddressErrorCode {
                family,
                code,
                reason,
            }
            | Attribute::LegacyAddressErrorCode {
                family,
                code,
                reason,
            } => encode_error_code(family.wire(), *code, reason, out),
            Attribute::PasswordAlgorithms(list) => {
                return list
                    .iter()
                    .all(|(algorithm, params)| encode_algorithm(*algorithm, params, out));
            }
            Attribute::PasswordAlgorithm(algorithm, params) => {
                return encode_algorithm(*algorithm, params, out);
            }
            Attribute::UnknownAttributes(kinds) => {
                for kind in kinds {
                    out.extend_from_slice(&kind.to_be_bytes());
                }
            }
            // RFC 8656 §18.2: channel number then RFFU.
            Attribute::ChannelNumber(channel) => {
                out.extend_from_slice(&channel.to_be_bytes());
                out.extend_from_slice(&[0, 0]);
            }
            Attribute::Lifetime(v) | Attribute::Priority(v) | Attribute::ConnectionId(v) => {
                out.extend_from_slice(&v.to_be_bytes())
            }
            Attribute::RequestedAddressFamily(family)
            | Attribute::AdditionalAddressFamily(family)
            | Attribute::LegacyAdditionalAddressFamily(family) => {
                out.extend_from_slice(&[family.wire(), 0, 0, 0])
            }
            Attribute::EvenPort { reserve } => out.push(if *reserve { 0x80 } else { 0 }),
            Attribute::RequestedTransport(protocol) => out.extend_from_slice(&[*protocol, 0, 0, 0]),
            Attribute::DontFragment | Attribute::UseCandidate => {}
            Attribute::ReservationToken(token) => out.extend_from_slice(token),
            Attribute::IceControlled(v) | Attribute::IceControlling(v) => {
                out.extend_from_slice(&v.to_be_bytes())
            }
            Attribute::Unknown { value, .. } => out.extend_from_slice(value),
        }
        true
    }

    /// Decodes and validates one attribute value. Unknown types are kept raw so the caller
    /// can answer 420 for comprehension-required ones (RFC 8489 §6.3.1).
    pub(crate) fn decode(
        kind: u16,
        value: &'a [u8],
        tid: &TransactionId,
    ) -> Result<Self, ParseError> {
        let decoded = match kind {
            t::MAPPED_ADDRESS => decode_address(value, None).map(Attribute::MappedAddress),
            t::ALTERNATE_SERVER => decode_address(value, None).map(Attribute::AlternateServer),
            t::XOR_MAPPED_ADDRESS => {
                decode_address(value, Some(tid)).map(Attribute::XorMappedAddress)
            }
            t::XOR_PEER_ADDRESS => decode_address(value, Some(tid)).map(Attribute::XorPeerAddress),
            t::XOR_RELAYED_ADDRESS => {
                decode_address(value, Some(tid)).map(Attribute::XorRelayedAddress)
            }
            t::USERNAME => (value.len() < USERNAME_MAX_BYTES)
                .then(|| std::str::from_utf8(value).ok())
                .flatten()
                .map(Attribute::Username),
            t::REALM => decode_text(value).map(Attribute::Realm),
            t::NONCE => decode_text(value).map(Attribute::Nonce),
            t::SOFTWARE => decode_text(value).map(Attribute::Software),
            t::ALTERNATE_DOMAIN => (value.len() < DOMAIN_MAX_BYTES)
                .then(|| std::str::from_utf8(value).ok())
                .flatten()
                .map(Attribute::AlternateDomain),
            t::USERHASH => value.try_into().ok().map(Attribute::Userhash),
            t::MESSAGE_INTEGRITY => value.try_into().ok().map(Attribute::MessageIntegrity),
            t::MESSAGE_INTEGRITY_SHA256 => ((16..=32).contains(&value.len())
                && value.len().is_multiple_of(4))
            .then_some(Attribute::MessageIntegritySha256(value)),
            t::FINGERPRINT => be32(value).map(Attribute::Fingerprint),
            t::ERROR_CODE => decode_error_code(value)
                .map(|(_, code, reason)| Attribute::ErrorCode { code, reason }),
            t::ADDRESS_ERROR_CODE => decode_error_code(value).and_then(|(family, code, reason)| {
                Some(Attribute::AddressErrorCode {
                    family: AddressFamily::from_wire(family)?,
                    code,
                    reason,
                })
            }),
            t::LEGACY_ADDRESS_ERROR_CODE => {
                decode_error_code(value).and_then(|(family, code, reason)| {
                    Some(Attribute::LegacyAddressErrorCode {
                        family: AddressFamily::from_wire(family)?,
                        code,
                        reason,
                    })
                })
            }
            t::PASSWORD_ALGORITHMS => decode_algorithms(value).map(Attribute::PasswordAlgorithms),
            t::PASSWORD_ALGORITHM => match decode_algorithms(value).as_deref() {
                Some(&[(algorithm, params)]) => {
                    Some(Attribute::PasswordAlgorithm(algorithm, params))
                }
                _ => None,
            },
            // RFC 8489 §14.13: a list of 16-bit types.
            t::UNKNOWN_ATTRIBUTES => value.len().is_multiple_of(2).then(|| {
                Attribute::UnknownAttributes(
                    value
                        .chunks_exact(2)
                        .filter_map(|pair| pair.try_into().ok())
                        .map(u16::from_be_bytes)
                        .collect(),
                )
            }),
            t::CHANNEL_NUMBER => match *value {
                [hi, lo, _, _] => Some(Attribute::ChannelNumber(u16::from_be_bytes([hi, lo]))),
                _ => None,
            },
            t::LIFETIME => be32(value).map(Attribute::Lifetime),
            t::PRIORITY => be32(value).map(Attribute::Priority),
            t::CONNECTION_ID => be32(value).map(Attribute::ConnectionId),
            t::DATA => Some(Attribute::Data(value)),
            t::REQUESTED_ADDRESS_FAMILY => {
                decode_family_word(value).map(Attribute::RequestedAddressFamily)
            }
            t::ADDITIONAL_ADDRESS_FAMILY => {
                decode_family_word(value).map(Attribute::AdditionalAddressFamily)
            }
            t::LEGACY_ADDITIONAL_ADDRESS_FAMILY => {
                decode_family_word(value).map(Attribute::LegacyAdditionalAddressFamily)
            }
            // RFC 8656 §18.6: one byte, R flag in the top bit, the rest RFFU.
            t::EVEN_PORT => match *value {
                [flags] => Some(Attribute::EvenPort {
                    reserve: flags & 0x80 != 0,
                }),
                _ => None,
            },
            // RFC 8656 §18.7: protocol then 24 bits RFFU.
            t::REQUESTED_TRANSPORT => match *value {
                [protocol, _, _, _] => Some(Attribute::RequestedTransport(protocol)),
                _ => None,
            },
            t::DONT_FRAGMENT => value.is_empty().then_some(Attribute::DontFragment),
            t::USE_CANDIDATE => value.is_empty().then_some(Attribute::UseCandidate),
            t::RESERVATION_TOKEN => value.try_into().ok().map(Attribute::ReservationToken),
            t::ICE_CONTROLLED => be64(value).map(Attribute::IceControlled),
            t::ICE_CONTROLLING => be64(value).map(Attribute::IceControlling),
            _ => Some(Attribute::Unknown { kind, value }),
        };
        decoded.ok_or(ParseError::BadAttribute { kind })
    }
}

fn be32(value: &[u8]) -> Option<u32> {
    value.try_into().ok().map(u32::from_be_bytes)
}

fn be64(value: &[u8]) -> Option<u64> {
    value.try_into().ok().map(u64::from_be_bytes)
}

fn decode_text(value: &[u8]) -> Option<&str> {
    if value.len() >= TEXT_MAX_BYTES {
        return None;
    }
    let text = std::str::from_utf8(value).ok()?;
    (text.chars().count() < TEXT_MAX_CHARS).then_some(text)
}

/// The 32-bit XOR mask of RFC 8489 §14.2 followed by the transaction ID, used for IPv6.
fn xor_mask(tid: &TransactionId) -> [u8; 16] {
    let mut mask = [0u8; 16];
    let (cookie, rest) = mask.split_at_mut(4);
    cookie.copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
    rest.copy_from_slice(&tid.0);
    mask
}

/// RFC 8489 §14.1 / §14.2: reserved byte, family, port, address; XOR'd when `tid` is given.
fn decode_address(value: &[u8], tid: Option<&TransactionId>) -> Option<SocketAddr> {
    let (head, address) = value.split_first_chunk::<4>()?;
    let [_, family, p0, p1] = *head;
    let mut port = u16::from_be_bytes([p0, p1]);
    let mut mask = [0u8; 16];
    if let Some(tid) = tid {
        mask = xor_mask(tid);
        port ^= (MAGIC_COOKIE >> 16) as u16;
    }
    let ip = match AddressFamily::from_wire(family)? {
        AddressFamily::V4 => {
            let mut octets: [u8; 4] = address.try_into().ok()?;
            octets.iter_mut().zip(mask).for_each(|(b, m)| *b ^= m);
            IpAddr::V4(Ipv4Addr::from(octets))
        }
        AddressFamily::V6 => {
            let mut octets: [u8; 16] = address.try_into().ok()?;
            octets.iter_mut().zip(mask).for_each(|(b, m)| *b ^= m);
            IpAddr::V6(Ipv6Addr::from(octets))
        }
    };
    Some(SocketAddr::new(ip, port))
}

fn encode_address(addr: SocketAddr, tid: Option<&TransactionId>, out: &mut Vec<u8>) {
    let mask = tid.map(xor_mask).unwrap_or_default();
    let port_mask = if tid.is_some() {
        (MAGIC_COOKIE >> 16) as u16
    } else {
        0
    };
    out.push(0);
    out.push(AddressFamily::of(&addr).wire());
    out.extend_from_slice(&(addr.port() ^ port_mask).to_be_bytes());
    match addr.ip() {
        IpAddr::V4(ip) => out.extend(ip.octets().iter().zip(mask).map(|(b, m)| b ^ m)),
        IpAddr::V6(ip) => out.extend(ip.octets().iter().zip(mask).map(|(b, m)| b ^ m)),
    }
}

/// RFC 8489 §14.8 (and RFC 8656 §18.12 for ADDRESS-ERROR-CODE, whose first byte is the
/// family): 21 reserved bits ignored on receipt, class 3..=6, number 0..=99, reason phrase.
fn decode_error_code(value: &[u8]) -> Option<(u8, u16, &str)> {
    let (head, reason) = value.split_first_chunk::<4>()?;
    let [first, _, class, number] = *head;
    let class = class & 0x07;
    if !(3..=6).contains(&class) || number > 99 {
        return None;
    }
    let code = u16::from(class) * 100 + u16::from(number);
    Some((first, code, decode_text(reason)?))
}

fn encode_error_code(first: u8, code: u16, reason: &str, out: &mut Vec<u8>) {
    // Class and number are 3 and 8 bits wide; out-of-range codes are the caller's bug but
    // must not spill into the reserved bits.
    let class = ((code / 100) & 0x07) as u8;
    let number = (code % 100) as u8;
    out.extend_from_slice(&[first, 0, class, number]);
    out.extend_from_slice(reason.as_bytes());
}

/// RFC 8489 §14.11 / §14.12: (algorithm, parameters length, parameters padded to 4 bytes)*.
fn decode_algorithms(mut value: &[u8]) -> Option<Vec<(u16, &[u8])>> {
    let mut list = Vec::new();
    while !value.is_empty() {
        let (head, rest) = value.split_first_chunk::<4>()?;
        let [a0, a1, l0, l1] = *head;
        let len = usize::from(u16::from_be_bytes([l0, l1]));
        let params = rest.get(..len)?;
        // The last parameter block may end at the attribute end, whose padding lies outside
        // the value; inner blocks carry their own padding.
        value = rest.get(padded(len)..).unwrap_or_default();
        list.push((u16::from_be_bytes([a0, a1]), params));
    }
    (!list.is_empty()).then_some(list)
}

fn encode_algorithm(algorithm: u16, params: &[u8], out: &mut Vec<u8>) -> bool {
    let Ok(len) = u16::try_from(params.len()) else {
        return false;
    };
    out.extend_from_slice(&algorithm.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(params);
    out.resize(out.len() + padded(params.len()) - params.len(), 0);
    true
}

/// RFC 8656 §18.8 / §18.11: family byte then 24 bits RFFU.
fn decode_family_word(value: &[u8]) -> Option<AddressFamily> {
    match *value {
        [family, _, _, _] => AddressFamily::from_wire(family),
        _ => None,
    }
}

/// Attribute values are padded to a 4-byte boundary (RFC 8489 §14).
pub(crate) const fn padded(len: usize) -> usize {
    (len + 3) & !3
}

#[cfg(test)]
mod tests {
    use super::*;

    const TID: TransactionId = TransactionId([0x5A; 12]);

    fn decode(kind: u16, value: &[u8]) -> Result<Attribute<'_>, ParseError> {
        Attribute::decode(kind, value, &TID)
    }

    fn bad(kind: u16) -> Result<Attribute<'static>, ParseError> {
        Err(ParseError::BadAttribute { kind })
    }

    #[test]
    fn fixed_size_values_reject_other_lengths() {
        let sizes: [(u16, &[usize]); 15] = [
            (t::USERHASH, &[32]),
            (t::MESSAGE_INTEGRITY, &[20]),
            (t::FINGERPRINT, &[4]),
            (t::CHANNEL_NUMBER, &[4]),
            (t::LIFETIME, &[4]),
            (t::PRIORITY, &[4]),
            (t::CONNECTION_ID, &[4]),
            (t::REQUESTED_TRANSPORT, &[4]),
            (t::EVEN_PORT, &[1]),
            (t::DONT_FRAGMENT, &[0]),
            (t::USE_CANDIDATE, &[0]),
            (t::RESERVATION_TOKEN, &[8]),
            (t::ICE_CONTROLLED, &[8]),
            (t::ICE_CONTROLLING, &[8]),
            (t::MESSAGE_INTEGRITY_SHA256, &[16, 20, 24, 28, 32]),
        ];
        let zeros = [0u8; 40];
        for (kind, valid) in sizes {
            for len in 0..=zeros.len() {
                let result = decode(kind, &zeros[..len]);
                if valid.contains(&len) {
                    assert!(result.is_ok(), "{kind:#x} len {len}");
                } else {
                    assert_eq!(result, bad(kind), "{kind:#x} len {len}");
                }
            }
        }
    }

    #[test]
    fn addresses_need_matching_family_and_length() {
        for kind in [
            t::MAPPED_ADDRESS,
            t::ALTERNATE_SERVER,
            t::XOR_MAPPED_ADDRESS,
            t::XOR_PEER_ADDRESS,
            t::XOR_RELAYED_ADDRESS,
        ] {
            for len in 0..=24 {
                for family in 0..=3u8 {
                    let mut value = vec![0u8; len];
                    if let Some(f) = value.get_mut(1) {
                        *f = family;
                    }
                    let ok = matches!((family, len), (1, 8) | (2, 20));
                    assert_eq!(decode(kind, &value).is_ok(), ok, "{kind:#x} {family} {len}");
                }
            }
        }
        // The leading reserved byte is ignored on receipt (RFC 8489 §14.1).
        assert_eq!(
            decode(t::MAPPED_ADDRESS, &[0xFF, 1, 0x0D, 0x96, 10, 0, 0, 1]),
            Ok(Attribute::MappedAddress("10.0.0.1:3478".parse().unwrap()))
        );
    }

    #[test]
    fn xor_addresses_use_cookie_and_transaction_id() {
        let v6: SocketAddr = "[2001:db8::1]:3478".parse().unwrap();
        let mut value = Vec::new();
        encode_address(v6, Some(&TID), &mut value);
        // Port XOR'd with the top of the cookie, address with cookie || transaction ID.
        assert_eq!(&value[..4], &[0, 2, 0x0D ^ 0x21, 0x96 ^ 0x12]);
        assert_eq!(
            &value[4..8],
            &[0x20 ^ 0x21, 0x01 ^ 0x12, 0x0D ^ 0xA4, 0xB8 ^ 0x42]
        );
        assert_eq!(value[19], 0x01 ^ 0x5A);
        assert_eq!(
            decode(t::XOR_PEER_ADDRESS, &value),
            Ok(Attribute::XorPeerAddress(v6))
        );
        let other_tid = TransactionId([0; 12]);
        assert_ne!(
            Attribute::decode(t::XOR_PEER_ADDRESS, &value, &other_tid),
            Ok(Attribute::XorPeerAddress(v6))
        );
    }

    #[test]
    fn text_limits() {
        assert!(decode(t::USERNAME, &[b'u'; 512]).is_ok());
        assert_eq!(decode(t::USERNAME, &[b'u'; 513]), bad(t::USERNAME));
        assert_eq!(decode(t::USERNAME, &[0xC3, 0x28]), bad(t::USERNAME));
        for kind in [t::REALM, t::NONCE, t::SOFTWARE] {
            assert!(decode(kind, &[b'r'; 127]).is_ok());
            assert_eq!(decode(kind, &[b'r'; 128]), bad(kind));
            assert_eq!(decode(kind, &[0xFF]), bad(kind));
            // 127 three-byte characters: 381 bytes, fine; 255 of them: 765 bytes, too long.
            assert!(decode(kind, "\u{30DE}".repeat(127).as_bytes()).is_ok());
            assert_eq!(decode(kind, "\u{30DE}".repeat(255).as_bytes()), bad(kind));
        }
        assert!(decode(t::ALTERNATE_DOMAIN, &[b'd'; 255]).is_ok());
        assert_eq!(
            decode(t::ALTERNATE_DOMAIN, &[b'd'; 256]),
            bad(t::ALTERNATE_DOMAIN)
        );
    }

    #[test]
    fn error_codes() {
        assert_eq!(
            decode(t::ERROR_CODE, b"\xFF\xFF\xFC\x01Unauthenticated"),
            Ok(Attribute::ErrorCode {
                code: 401,
                reason: "Unauthenticated"
            }),
            "reserved bits are ignored"
        );
        assert_eq!(
            decode(t::ERROR_CODE, &[0, 0, 6, 99]),
            Ok(Attribute::ErrorCode {
                code: 699,
                reason: ""
            })
        );
        for value in [
            &[0, 0, 2, 0][..],
            &[0, 0, 7, 0],
            &[0, 0, 4, 100],
            &[0, 0, 4],
            &[0, 0, 4, 0, 0xFF],
        ] {
            assert_eq!(
                decode(t::ERROR_CODE, value),
                bad(t::ERROR_CODE),
                "{value:?}"
            );
        }
        assert_eq!(
            decode(t::ADDRESS_ERROR_CODE, b"\x02\x00\x04\x28no"),
            Ok(Attribute::AddressErrorCode {
                family: AddressFamily::V6,
                code: 440,
                reason: "no"
            })
        );
        assert_eq!(
            decode(t::ADDRESS_ERROR_CODE, &[3, 0, 4, 40]),
            bad(t::ADDRESS_ERROR_CODE)
        );
    }

    #[test]
    fn password_algorithms() {
        assert_eq!(
            decode(t::PASSWORD_ALGORITHMS, &[0, 2, 0, 0, 0, 1, 0, 0]),
            Ok(Attribute::PasswordAlgorithms(vec![
                (2, &[][..]),
                (1, &[][..])
            ]))
        );
        // Inner parameters are padded; the last block's padding may be the attribute's.
        assert_eq!(
            decode(
                t::PASSWORD_ALGORITHMS,
                &[0, 9, 0, 1, 0xAA, 0, 0, 0, 0, 8, 0, 2, 0xBB, 0xCC]
            ),
            Ok(Attribute::PasswordAlgorithms(vec![
                (9, &[0xAA][..]),
                (8, &[0xBB, 0xCC][..])
            ]))
        );
        for value in [
            &[][..],
            &[0, 1, 0],
            &[0, 1, 0, 4, 1, 2, 3],
            &[0, 1, 0, 0, 0],
        ] {
            assert_eq!(
                decode(t::PASSWORD_ALGORITHMS, value),
                bad(t::PASSWORD_ALGORITHMS)
            );
        }
        assert_eq!(
            decode(t::PASSWORD_ALGORITHM, &[0, 1, 0, 0]),
            Ok(Attribute::PasswordAlgorithm(
                PasswordAlgorithm::Md5.wire(),
                &[]
            ))
        );
        assert_eq!(
            decode(t::PASSWORD_ALGORITHM, &[0, 1, 0, 0, 0, 2, 0, 0]),
            bad(t::PASSWORD_ALGORITHM),
            "exactly one algorithm"
        );
        assert_eq!(
            PasswordAlgorithm::from_wire(2),
            Some(PasswordAlgorithm::Sha256)
        );
        assert_eq!(PasswordAlgorithm::from_wire(3), None);
    }

    #[test]
    fn small_turn_attributes() {
        assert_eq!(
            decode(t::CHANNEL_NUMBER, &[0x40, 0x01, 0xFF, 0xFF]),
            Ok(Attribute::ChannelNumber(0x4001))
        );
        assert_eq!(
            decode(t::REQUESTED_TRANSPORT, &[17, 1, 2, 3]),
            Ok(Attribute::RequestedTransport(17))
        );
        assert_eq!(
            decode(t::EVEN_PORT, &[0x80]),
            Ok(Attribute::EvenPort { reserve: true })
        );
        assert_eq!(
            decode(t::EVEN_PORT, &[0x7F]),
            Ok(Attribute::EvenPort { reserve: false })
        );
        for kind in [
            t::REQUESTED_ADDRESS_FAMILY,
            t::ADDITIONAL_ADDRESS_FAMILY,
            t::LEGACY_ADDITIONAL_ADDRESS_FAMILY,
        ] {
            assert!(decode(kind, &[1, 0, 0, 0]).is_ok());
            assert!(decode(kind, &[2, 0, 0, 0]).is_ok());
            assert_eq!(decode(kind, &[3, 0, 0, 0]), bad(kind));
            assert_eq!(decode(kind, &[1, 0, 0]), bad(kind));
        }
        assert_eq!(
            decode(t::UNKNOWN_ATTRIBUTES, &[0x00, 0x31, 0x80, 0x00]),
            Ok(Attribute::UnknownAttributes(vec![0x0031, 0x8000]))
        );
        assert_eq!(
            decode(t::UNKNOWN_ATTRIBUTES, &[0, 1, 2]),
            bad(t::UNKNOWN_ATTRIBUTES)
        );
        assert_eq!(
            decode(0x4444, &[1, 2, 3]),
            Ok(Attribute::Unknown {
                kind: 0x4444,
                value: &[1, 2, 3]
            })
        );
    }

    #[test]
    fn kind_matches_decoder() {
        // Every variant's kind() decodes back to the same variant.
        let addr: SocketAddr = "192.0.2.1:1".parse().unwrap();
        let samples = [
            Attribute::MappedAddress(addr),
            Attribute::XorMappedAddress(addr),
            Attribute::AlternateServer(addr),
            Attribute::XorPeerAddress(addr),
            Attribute::XorRelayedAddress(addr),
            Attribute::Username("u"),
            Attribute::Realm("r"),
            Attribute::Nonce("n"),
            Attribute::Software("s"),
            Attribute::AlternateDomain("d"),
            Attribute::Lifetime(1),
            Attribute::Priority(2),
            Attribute::DontFragment,
            Attribute::UseCandidate,
        ];
        for attribute in samples {
            let mut value = Vec::new();
            assert!(attribute.encode_value(&TID, &mut value));
            assert_eq!(decode(attribute.kind(), &value), Ok(attribute));
        }
    }
}
