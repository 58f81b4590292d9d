//! TURN (RFC 8656): relaying for clients that cannot reach their peers directly.

pub mod allocation;
pub mod channel_data;
pub mod peer_policy;
pub mod ports;
pub mod rate_limit;
pub mod server;

use std::net::SocketAddr;

pub use server::{RelayAddress, Server, ServerConfig, Stats, Transmit};

/// The client transport an allocation was made over (RFC 8656 §3.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Transport {
    Udp,
    Tcp,
    Tls,
}

/// Client address, server address and transport: what identifies an allocation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FiveTuple {
    pub transport: Transport,
    pub client: SocketAddr,
    pub server: SocketAddr,
}
