//! Rampart's control service.
//!
//! The gRPC (tonic) service, reachable over mutual TLS (rustls, TLS 1.3 only) and nothing
//! else, that front-end nodes use for session setup (short-lived TURN credentials for their
//! users, conference registration, access policy, user revocation), that relay agents
//! register with to receive policy, conference keys and revocations as a stream, and that
//! operators query. Each caller's role comes from its client certificate's SANs. Its state
//! lives in one redb file and survives a restart. The contract is in the `proto` crate.
//!
//! - [`config`]: the TOML configuration, validated into typed values.
//! - [`tls`], [`identity`], [`server`]: mutual TLS, roles from SANs, the listener.
//! - [`store`], [`state`]: durable state and the changes streamed to agents.
//! - [`service`]: the front-end, relay-agent and operator APIs.
//! - [`credentials`]: the TURN REST API credential scheme.
//! - [`client`]: the mutual-TLS client side, for Rust callers (its own crate, `control-link`,
//!   which the agent links instead of this one).
//! - [`call`]: any RPC by name with JSON in and out (`rampart-control call`).

pub mod call;
pub use control_link::client;
pub mod config;
pub mod credentials;
pub mod identity;
pub mod server;
pub mod service;
pub mod state;
pub mod store;
pub mod tls;

pub use config::{Config, ConfigError};
pub use server::serve;

/// Why the control service cannot start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("configuration: {0}")]
    Config(#[from] ConfigError),
    #[error("TLS: {0}")]
    Tls(#[from] tls::TlsError),
    #[error("state: {0}")]
    Store(#[from] store::StoreError),
    #[error("cannot listen: {0}")]
    Listen(std::io::Error),
    #[error("serving failed: {0}")]
    Serve(String),
    #[error("internal error: {0}")]
    Internal(String),
}
