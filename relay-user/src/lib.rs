//! Rampart edge agent: the wiring of the shells around the role crates.
//!
//! Protocol logic lives in crates without I/O: the TURN core ([`rampart_turn`]), the Access
//! Edge's SIP core ([`rampart_sip`]), the conferencing protocol ([`rampart_psom`]). The XDP
//! program's loader and fast path are [`rampart_xdp`]. [`server`] is the tokio shell around
//! them, [`config`] the agent's configuration, [`psom`] conferencing admission.

pub mod config;
pub mod psom;
pub mod server;
