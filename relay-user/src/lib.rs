//! Rampart edge agent.
//!
//! Protocol logic is sans-IO: [`stun`] is the message codec, [`turn`] the allocation state
//! machine fed bytes and time. [`server`] is the thin tokio shell around them.

pub mod auth;
pub mod config;
pub mod psom;
pub mod server;
pub mod sip;
pub mod stun;
pub mod turn;
pub mod xdp;
