//! Opaque tokens the edge hands out in its own Via branches, Record-Route and Contact URIs,
//! and reads back when a response or an in-dialog request returns: which connection to use,
//! and the internal Vias, Record-Routes and Contacts it hid from the outside.
//!
//! Sealed with ChaCha20-Poly1305 so that the outside can neither read the internal topology
//! nor forge a token that steers a request to another connection. The nonce is derived from
//! the plaintext (an HMAC of it): the same input gives the same token, which a stateless
//! proxy needs (a CANCEL must carry the branch of the INVITE it cancels, RFC 3261 section
//! 16.11), at the cost of showing that two tokens are equal, which says nothing here.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use ring::hmac;
use serde::{Serialize, de::DeserializeOwned};

/// Tokens longer than this are not opened (a Via branch is not a place for kilobytes).
const MAX_TOKEN_CHARS: usize = 8_192;

pub struct Sealer {
    key: LessSafeKey,
    nonce_key: hmac::Key,
}

impl Sealer {
    /// A sealer with fresh random keys: tokens do not outlive the process.
    pub fn random() -> Sealer {
        let key_bytes: [u8; 32] = rand::random();
        let nonce_bytes: [u8; 32] = rand::random();
        Sealer::from_keys(&key_bytes, &nonce_bytes)
    }

    /// A sealer whose keys derive from a shared secret: tokens survive a restart and are
    /// understood by every edge holding the same secret (several edges behind one name).
    pub fn from_secret(secret: &[u8]) -> Sealer {
        let derive = |label: &[u8]| -> [u8; 32] {
            let mut context = ring::digest::Context::new(&ring::digest::SHA256);
            context.update(label);
            context.update(secret);
            context
                .finish()
                .as_ref()
                .try_into()
                .expect("SHA-256 is 32 bytes")
        };
        Sealer::from_keys(
            &derive(b"rampart sip token key\0"),
            &derive(b"rampart sip token nonce\0"),
        )
    }

    pub fn from_keys(key: &[u8; 32], nonce_key: &[u8; 32]) -> Sealer {
        let unbound = UnboundKey::new(&aead::CHACHA20_POLY1305, key).expect("a 32-byte key");
        Sealer {
            key: LessSafeKey::new(unbound),
            nonce_key: hmac::Key::new(hmac::HMAC_SHA256, nonce_key),
        }
    }

    pub fn seal<T: Serialize>(&self, value: &T) -> String {
        let mut data = serde_json::to_vec(value).expect("token values serialize");
        let tag = hmac::sign(&self.nonce_key, &data);
        let mut nonce = [0u8; aead::NONCE_LEN];
        nonce.copy_from_slice(&tag.as_ref()[..aead::NONCE_LEN]);
        self.key
            .seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::empty(), &mut data)
            .expect("sealing cannot fail for these sizes");
        let mut token = nonce.to_vec();
        token.extend_from_slice(&data);
        URL_SAFE_NO_PAD.encode(token)
    }

    /// The value, or `None` for anything this edge did not seal.
    pub fn open<T: DeserializeOwned>(&self, token: &str) -> Option<T> {
        if token.len() > MAX_TOKEN_CHARS {
            return None;
        }
        let mut bytes = URL_SAFE_NO_PAD.decode(token).ok()?;
        if bytes.len() < aead::NONCE_LEN + aead::CHACHA20_POLY1305.tag_len() {
            return None;
        }
        let mut ciphertext = bytes.split_off(aead::NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(&bytes).ok()?;
        let plain = self
            .key
            .open_in_place(nonce, Aad::empty(), &mut ciphertext)
            .ok()?;
        serde_json::from_slice(plain).ok()
    }

    /// A short deterministic tag for `input` (To tags of the edge's own responses).
    pub fn short_tag(&self, input: &str) -> String {
        let tag = hmac::sign(&self.nonce_key, input.as_bytes());
        tag.as_ref()[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_is_deterministic_and_refuses_forgery() {
        let sealer = Sealer::random();
        let token = sealer.seal(&(7u64, "SIP/2.0/TLS 10.0.0.5:5061;branch=z9hG4bKx"));
        assert_eq!(
            token,
            sealer.seal(&(7u64, "SIP/2.0/TLS 10.0.0.5:5061;branch=z9hG4bKx"))
        );
        assert!(!token.contains("10.0.0.5"));
        let opened: (u64, String) = sealer.open(&token).unwrap();
        assert_eq!(opened.0, 7);
        let mut forged = token.into_bytes();
        let last = forged.len() - 1;
        forged[last] = if forged[last] == b'A' { b'B' } else { b'A' };
        assert!(
            sealer
                .open::<(u64, String)>(std::str::from_utf8(&forged).unwrap())
                .is_none()
        );
        assert!(Sealer::random().open::<(u64, String)>("AAAA").is_none());
        let shared = Sealer::from_secret(b"a secret of the operator's").seal(&7u64);
        assert_eq!(
            Sealer::from_secret(b"a secret of the operator's").open::<u64>(&shared),
            Some(7)
        );
        assert_eq!(
            Sealer::from_secret(b"another secret").open::<u64>(&shared),
            None
        );
        assert!(sealer.open::<(u64, String)>("not base64 !").is_none());
    }
}
