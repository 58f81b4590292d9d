//! Sans-IO STUN codec: RFC 8489 messages with the TURN (RFC 8656) and ICE (RFC 8445)
//! attributes a relay meets.
//!
//! [`Message::parse`] borrows from the datagram and validates everything it decodes, so the
//! rest of the server only sees well-formed values; [`MessageBuilder`] encodes responses and
//! indications. Nothing here panics on any input byte sequence.
//!
//! Credentials: SASLprep / OpaqueString (RFC 8265) preparation of usernames and passwords is
//! out of scope. Keys are derived from the bytes exactly as given (see [`integrity`]), so the
//! configured credentials must already be in their prepared form.

pub mod attributes;
pub mod integrity;
pub mod message;

pub use attributes::{AddressFamily, Attribute, PasswordAlgorithm, attr_type};
pub use integrity::{long_term_key, reason_phrase, short_term_key, userhash};
pub use message::{
    Class, IntegrityKind, MAGIC_COOKIE, MAX_ATTRIBUTES, Message, MessageBuilder, Method,
    ParseError, TransactionId,
};

/// Decodes test-vector hex, skipping whitespace.
#[cfg(test)]
pub(crate) fn hex(s: &str) -> Vec<u8> {
    let digits: Vec<u8> = s.bytes().filter(u8::is_ascii_hexdigit).collect();
    digits
        .chunks(2)
        .map(|pair| u8::from_str_radix(std::str::from_utf8(pair).unwrap(), 16).unwrap())
        .collect()
}
