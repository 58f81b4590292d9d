//! Rampart's wire contract.
//!
//! What will live here: the `.proto` files and the code generated from them (prost/tonic),
//! the one contract between the agent (`relay-user`), the control service (`control`) and the
//! front-end nodes.
