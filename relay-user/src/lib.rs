//! Rampart edge agent.
//!
//! Protocol logic is sans-IO: the TURN core is its own crate ([`rampart_turn`]), [`next_hop`]
//! the cache of where the XDP program sends each bound channel. [`server`] is the thin tokio
//! shell around them, [`netlink`] the next-hop cache's.

pub mod config;
pub mod netlink;
pub mod next_hop;
pub mod psom;
pub mod server;
pub mod sip;
pub mod xdp;
