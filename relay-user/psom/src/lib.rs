//! The Web Conferencing Edge's protocol, shared by the edge (`relay-user`) and the internal
//! side (see `docs/psom.md`):
//!
//! - [`frame`]: the frames of both legs (sans-IO);
//! - [`internal`]: what an internal conferencing server embeds to dial the edge and receive
//!   its participants;
//! - [`reference`]: a reference conferencing server built on it (shared-state broadcast),
//!   used by the tests and by `cargo xtask run` (binary `rampart-conference-server`).

pub mod frame;
pub mod internal;
pub mod reference;
