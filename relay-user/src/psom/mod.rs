//! The Web Conferencing Edge (PSOM): outside participants of web conferences reach internal
//! conferencing servers through the edge, admitted only with a valid conference session key,
//! over connections the internal servers dialled out to the edge. The frames are in the
//! `rampart-psom` crate (`docs/psom.md`); [`admission`] is the decision, sans-IO; the I/O is
//! `server::conferencing`.

pub mod admission;

pub use admission::{Admission, ConferencingCounters};
pub use rampart_psom::frame::{Frame, Join, RejectReason};
