//! STUN long-term credentials (RFC 8489 §9.2): who may use the relay, and the nonces that
//! make a captured request useless elsewhere or later.

pub mod credentials;
pub mod nonce;

pub use credentials::{CredentialError, Credentials, RestSecrets};
pub use nonce::{NonceCheck, NonceIssuer};
