//! What a client of Rampart's control service needs, shared by the agent and the service
//! itself: the mutual-TLS link ([`client`]) and the names in certificates ([`san`]). The agent
//! links this, not the service's server side (tonic's server, redb).

pub mod client;
pub mod san;

use std::sync::Arc;

use rustls::crypto::CryptoProvider;

/// The crypto provider everything here uses: ring, like the rest of the workspace.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}
