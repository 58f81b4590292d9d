//! Rampart edge agent.
//!
//! Protocol logic is sans-IO: [`stun`] is the message codec, [`turn`] the allocation state
//! machine fed bytes and time, [`next_hop`] the cache of where the XDP program sends each
//! bound channel. [`server`] is the thin tokio shell around them, [`netlink`] the next-hop
//! cache's.

pub mod auth;
pub mod config;
pub mod netlink;
pub mod next_hop;
pub mod psom;
pub mod server;
pub mod sip;
pub mod stun;
pub mod turn;
pub mod xdp;
