//! Rampart's load generator and load test.
//!
//! The generator speaks real TURN: it creates allocations with TURN REST credentials through
//! the relay's normal signalling, binds a channel per allocation to a peer, and drives
//! media-like traffic both ways (ChannelData from the clients, plain UDP from the peer),
//! counting, timestamping and sequencing every packet where it arrives ([`traffic`],
//! [`payload`], [`stats`]). The load test ([`suite`]) runs the same workload against Rampart
//! with the XDP path, Rampart in userspace and coturn ([`systems`]), each in the network
//! namespace topology of the XDP tests, steps the rate to each one's saturation point,
//! measures allocation churn and memory per allocation ([`signalling`]) and the CPU time of
//! the relay and of the kernel's softirq ([`cpu`]), and reports ([`report`]).

pub mod cpu;
pub mod injection;
pub mod isolation;
pub mod payload;
pub mod report;
pub mod signalling;
pub mod stats;
pub mod suite;
pub mod systems;
pub mod traffic;
pub mod xdp;
