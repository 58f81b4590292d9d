//! Credential keys (RFC 8489 §9), HMAC / CRC primitives and error reason phrases.
//!
//! Usernames, realms and passwords are used as the exact bytes given: SASLprep / OpaqueString
//! (RFC 8265) preparation is out of scope, so callers must pass already-prepared strings.

use hmac::{Hmac, Mac};
use md5::Md5;
use sha1::Sha1;
use sha2::{Digest, Sha256};

use super::attributes::PasswordAlgorithm;

/// XOR'd into the CRC-32 so a FINGERPRINT never matches another protocol's CRC (RFC 8489 §14.7).
pub(crate) const FINGERPRINT_XOR: u32 = 0x5354_554E;

/// Long-term credential key (RFC 8489 §9.2.2): MD5 (16 bytes) or SHA-256 (32 bytes) of
/// `username ":" realm ":" password`.
pub fn long_term_key(
    username: &str,
    realm: &str,
    password: &str,
    algorithm: PasswordAlgorithm,
) -> Vec<u8> {
    fn digest<D: Digest>(parts: [&str; 5]) -> Vec<u8> {
        let mut hasher = D::new();
        for part in parts {
            hasher.update(part.as_bytes());
        }
        hasher.finalize().to_vec()
    }
    let parts = [username, ":", realm, ":", password];
    match algorithm {
        PasswordAlgorithm::Md5 => digest::<Md5>(parts),
        PasswordAlgorithm::Sha256 => digest::<Sha256>(parts),
    }
}

/// Short-term credential key (RFC 8489 §9.1.1): the password itself.
pub fn short_term_key(password: &str) -> Vec<u8> {
    password.as_bytes().to_vec()
}

/// USERHASH = SHA-256(username ":" realm) (RFC 8489 §14.4).
pub fn userhash(username: &str, realm: &str) -> [u8; 32] {
    Sha256::new()
        .chain_update(username.as_bytes())
        .chain_update(b":")
        .chain_update(realm.as_bytes())
        .finalize()
        .into()
}

/// Standard reason phrases (RFC 8489 §14.8, RFC 8656 §19, RFC 8016 §3.2, RFC 8445 §7.3.1.1).
pub fn reason_phrase(code: u16) -> &'static str {
    match code {
        300 => "Try Alternate",
        400 => "Bad Request",
        401 => "Unauthenticated",
        403 => "Forbidden",
        405 => "Mobility Forbidden",
        420 => "Unknown Attribute",
        437 => "Allocation Mismatch",
        438 => "Stale Nonce",
        440 => "Address Family not Supported",
        441 => "Wrong Credentials",
        442 => "Unsupported Transport Protocol",
        443 => "Peer Address Family Mismatch",
        446 => "Connection Already Exists",
        447 => "Connection Timeout or Failure",
        486 => "Allocation Quota Reached",
        487 => "Role Conflict",
        500 => "Server Error",
        508 => "Insufficient Capacity",
        _ => "Unknown Error",
    }
}

fn mac<M: Mac + hmac::digest::KeyInit>(key: &[u8], parts: &[&[u8]]) -> M {
    // HMAC is defined for keys of every length (RFC 2104 §2), so this cannot fail.
    let mut mac = <M as Mac>::new_from_slice(key).expect("HMAC accepts keys of any length");
    for part in parts {
        mac.update(part);
    }
    mac
}

pub(crate) fn hmac_sha1(key: &[u8], parts: &[&[u8]]) -> [u8; 20] {
    mac::<Hmac<Sha1>>(key, parts).finalize().into_bytes().into()
}

pub(crate) fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    mac::<Hmac<Sha256>>(key, parts)
        .finalize()
        .into_bytes()
        .into()
}

pub(crate) fn fingerprint(parts: &[&[u8]]) -> u32 {
    let mut crc = crc32fast::Hasher::new();
    for part in parts {
        crc.update(part);
    }
    crc.finalize() ^ FINGERPRINT_XOR
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stun::hex;

    const USER: &str = "\u{30DE}\u{30C8}\u{30EA}\u{30C3}\u{30AF}\u{30B9}";

    #[test]
    fn userhash_matches_rfc8489_b1() {
        // USERHASH value of the RFC 8489 Appendix B.1 vector (as corrected by erratum 6268).
        let expected =
            hex("4a3cf38f ef6992bd a952c678 0417da0f 24819415 569e60b2 05c46e41 407f1704");
        assert_eq!(userhash(USER, "example.org").to_vec(), expected);
    }

    #[test]
    fn long_term_key_lengths_and_inputs() {
        let md5 = long_term_key("user", "realm", "pass", PasswordAlgorithm::Md5);
        assert_eq!(md5, Md5::digest(b"user:realm:pass").to_vec());
        assert_eq!(md5.len(), 16);
        let sha = long_term_key("user", "realm", "pass", PasswordAlgorithm::Sha256);
        assert_eq!(sha, Sha256::digest(b"user:realm:pass").to_vec());
        assert_eq!(sha.len(), 32);
        // Bytes are used as given: no SASLprep, so a soft hyphen changes the key.
        assert_ne!(
            long_term_key("user", "realm", "pa\u{AD}ss", PasswordAlgorithm::Md5),
            md5
        );
    }

    #[test]
    fn short_term_key_is_password_bytes() {
        assert_eq!(
            short_term_key("VOkJxbRl1RmTxUk/WvJxBt"),
            b"VOkJxbRl1RmTxUk/WvJxBt"
        );
    }

    #[test]
    fn reason_phrases() {
        assert_eq!(reason_phrase(300), "Try Alternate");
        assert_eq!(reason_phrase(401), "Unauthenticated");
        assert_eq!(reason_phrase(437), "Allocation Mismatch");
        assert_eq!(reason_phrase(438), "Stale Nonce");
        assert_eq!(reason_phrase(441), "Wrong Credentials");
        assert_eq!(reason_phrase(442), "Unsupported Transport Protocol");
        assert_eq!(reason_phrase(486), "Allocation Quota Reached");
        assert_eq!(reason_phrase(508), "Insufficient Capacity");
        assert_eq!(reason_phrase(599), "Unknown Error");
        for code in [
            300, 400, 401, 403, 405, 420, 437, 438, 440, 441, 442, 443, 486, 500, 508,
        ] {
            assert_ne!(reason_phrase(code), "Unknown Error", "{code}");
        }
    }

    #[test]
    fn hmac_known_answer() {
        // RFC 2202 test case 2 / RFC 4231 test case 2.
        let sha1 = hmac_sha1(b"Jefe", &[b"what do ya want ", b"for nothing?"]);
        assert_eq!(
            sha1.to_vec(),
            hex("effcdf6ae5eb2fa2d27416d5f184df9c259a7c79")
        );
        let sha256 = hmac_sha256(b"Jefe", &[b"what do ya want for nothing?"]);
        assert_eq!(
            sha256.to_vec(),
            hex("5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843")
        );
    }
}
