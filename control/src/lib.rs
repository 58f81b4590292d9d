//! Rampart's control service.
//!
//! What will live here: the gRPC (tonic) service, reachable over mutual TLS (rustls) only, that
//! front-end nodes use for session setup (short-lived TURN credentials for their users,
//! conference registration, policy) and that relay agents register with to receive policy,
//! conference keys and revocations as a stream. Its state survives a restart. The contract is
//! in the `proto` crate.
