//! Stateless nonces (RFC 8489 §9.2): the server issues them without remembering them and
//! checks them by MAC, so a flood of unauthenticated requests costs no memory.
//!
//! Layout: `obMatJos2` (the nonce cookie, RFC 8489 §9.2) + 4 base64 characters of the 24-bit
//! STUN Security Features (we set "Password algorithms") + base64url(expiry ‖ MAC), where expiry
//! is seconds since the issuer was created and MAC = HMAC-SHA256(key, expiry ‖ client IP)
//! truncated to 96 bits. The key is random per process: a restart makes old nonces stale (438),
//! which clients recover from on their own.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

/// The nonce cookie prefix that announces RFC 8489 security features.
pub const NONCE_COOKIE: &str = "obMatJos2";
/// Security features: bit 0 (the most significant of 24), "Password algorithms".
const FEATURES_PASSWORD_ALGORITHMS: &str = "gAAA";
const MAC_LEN: usize = 12;

/// What a nonce from a client turned out to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NonceCheck {
    Valid,
    /// Ours, but expired: answer 438 with a fresh one.
    Stale,
    /// Not ours, or for another client address: also 438 (RFC 8489 §9.2.4 treats any nonce that
    /// is "no longer valid" alike), counted apart.
    Forged,
}

pub struct NonceIssuer {
    key: [u8; 32],
    epoch: Instant,
    lifetime: Duration,
}

impl NonceIssuer {
    pub fn new(key: [u8; 32], epoch: Instant, lifetime: Duration) -> Self {
        NonceIssuer {
            key,
            epoch,
            lifetime,
        }
    }

    /// Whether nonces from this issuer announce the PASSWORD-ALGORITHMS feature.
    pub fn announces_password_algorithms(nonce: &str) -> bool {
        nonce
            .strip_prefix(NONCE_COOKIE)
            .is_some_and(|rest| rest.starts_with(FEATURES_PASSWORD_ALGORITHMS))
    }

    pub fn issue(&self, client: IpAddr, now: Instant) -> String {
        let expiry = (now.saturating_duration_since(self.epoch) + self.lifetime).as_secs();
        let expiry = u32::try_from(expiry).unwrap_or(u32::MAX).to_be_bytes();
        let mut body = [0u8; 4 + MAC_LEN];
        body[..4].copy_from_slice(&expiry);
        body[4..].copy_from_slice(&self.mac(&expiry, client));
        format!(
            "{NONCE_COOKIE}{FEATURES_PASSWORD_ALGORITHMS}{}",
            URL_SAFE_NO_PAD.encode(body)
        )
    }

    pub fn check(&self, nonce: &str, client: IpAddr, now: Instant) -> NonceCheck {
        let Some(encoded) = nonce
            .strip_prefix(NONCE_COOKIE)
            .and_then(|rest| rest.strip_prefix(FEATURES_PASSWORD_ALGORITHMS))
        else {
            return NonceCheck::Forged;
        };
        let mut body = [0u8; 4 + MAC_LEN];
        match URL_SAFE_NO_PAD.decode_slice(encoded, &mut body) {
            Ok(n) if n == body.len() => {}
            _ => return NonceCheck::Forged,
        }
        let expiry: [u8; 4] = body[..4].try_into().expect("4 bytes");
        if !bool::from(self.mac(&expiry, client).ct_eq(&body[4..])) {
            return NonceCheck::Forged;
        }
        let expires_at = self.epoch + Duration::from_secs(u32::from_be_bytes(expiry).into());
        if now >= expires_at {
            NonceCheck::Stale
        } else {
            NonceCheck::Valid
        }
    }

    fn mac(&self, expiry: &[u8; 4], client: IpAddr) -> [u8; MAC_LEN] {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("any key length");
        mac.update(expiry);
        match client {
            IpAddr::V4(v4) => mac.update(&v4.octets()),
            IpAddr::V6(v6) => mac.update(&v6.octets()),
        }
        let full = mac.finalize().into_bytes();
        full[..MAC_LEN].try_into().expect("MAC_LEN <= 32")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLIENT: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 7));

    fn issuer(epoch: Instant) -> NonceIssuer {
        NonceIssuer::new([7; 32], epoch, Duration::from_secs(600))
    }

    #[test]
    fn fresh_nonce_is_valid_then_stale_after_its_lifetime() {
        let t0 = crate::test_origin();
        let n = issuer(t0).issue(CLIENT, t0 + Duration::from_secs(10));
        assert!(n.starts_with("obMatJos2gAAA"));
        assert!(NonceIssuer::announces_password_algorithms(&n));
        let i = issuer(t0);
        assert_eq!(
            i.check(&n, CLIENT, t0 + Duration::from_secs(609)),
            NonceCheck::Valid
        );
        assert_eq!(
            i.check(&n, CLIENT, t0 + Duration::from_secs(610)),
            NonceCheck::Stale
        );
    }

    #[test]
    fn nonce_is_bound_to_client_and_key() {
        let t0 = crate::test_origin();
        let n = issuer(t0).issue(CLIENT, t0);
        let other: IpAddr = "192.0.2.8".parse().unwrap();
        assert_eq!(issuer(t0).check(&n, other, t0), NonceCheck::Forged);
        let other_key = NonceIssuer::new([8; 32], t0, Duration::from_secs(600));
        assert_eq!(other_key.check(&n, CLIENT, t0), NonceCheck::Forged);
    }

    #[test]
    fn garbage_nonces_are_forged_not_panics() {
        let t0 = crate::test_origin();
        let i = issuer(t0);
        for n in [
            "",
            "obMatJos2",
            "obMatJos2gAAA",
            "obMatJos2gAAA!!!!",
            "f//499k954d6OL34oL9FSTvy64sA",
        ] {
            assert_eq!(i.check(n, CLIENT, t0), NonceCheck::Forged, "{n:?}");
        }
        let mut n = i.issue(CLIENT, t0);
        n.push('A');
        assert_eq!(i.check(&n, CLIENT, t0), NonceCheck::Forged);
    }
}
