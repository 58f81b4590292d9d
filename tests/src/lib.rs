//! Shared harness for Rampart's end-to-end tests: network namespaces and veth pairs, agent and
//! peer processes (coturn's clients, aioice, SIP tools), and test certificates. Each scenario
//! is one file under `tests/tests/`.
//!
//! Tests send traffic only to loopback or to test hosts in namespaces they create and remove.
