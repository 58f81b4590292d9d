//! Rampart's TURN core (RFC 8656 over RFC 8489): relaying for clients that cannot reach their
//! peers directly, as a state machine without I/O.
//!
//! [`stun`] is the message codec, [`auth`] the long-term credentials and nonces, [`Server`]
//! the allocations, permissions, channels and quotas. Nothing here opens a socket, starts a
//! task or reads a clock (the crate's `clippy.toml` keeps them out): the shell feeds input
//! with the current time and carries out what the server asks for.

pub mod allocation;
pub mod auth;
pub mod bandwidth;
pub mod channel_data;
pub mod peer_policy;
pub mod ports;
pub mod server;
pub mod shared;
pub mod stun;

use std::net::SocketAddr;

pub use server::{RelayAddress, Server, ServerConfig, Stats, Transmit};
pub use shared::SharedState;

/// The client transport an allocation was made over (RFC 8656 §3.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Transport {
    Udp,
    Tcp,
    Tls,
}

/// Client address, server address and transport: what identifies an allocation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FiveTuple {
    pub transport: Transport,
    pub client: SocketAddr,
    pub server: SocketAddr,
}

/// Tests' origin of time: std has no other way to make an `Instant`, and which one it is never
/// matters to the core.
#[cfg(test)]
#[allow(clippy::disallowed_methods)]
pub(crate) fn test_origin() -> std::time::Instant {
    std::time::Instant::now()
}
