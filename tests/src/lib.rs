//! Shared harness of Rampart's end-to-end tests (one file per scenario in `tests/tests/`).
//!
//! - [`process`]: runs the real `rampart` binary on a generated configuration, waits until
//!   every listener answers, and kills it on drop (its log is printed then, which the test
//!   runner shows only for a failed test).
//! - [`client`]: a small blocking TURN client (UDP, TCP, TLS; IPv4 and IPv6) built on
//!   Rampart's sans-IO codec. The interop tests use clients we did not write as well.
//! - [`control`]: the `rampart-control` binary as a child process, its PKI and a front-end
//!   client, for the agent's control-link tests.
//! - [`conferencing`]: participants of the Web Conferencing Edge, and the reference
//!   conferencing server dialling its internal port.
//! - [`certs`]: a throw-away CA and a `localhost` certificate for the TLS listeners.
//! - [`chromium`]: headless Chromium driven over the DevTools protocol on a pipe, for a real
//!   browser's WebRTC call through the edge.
//! - [`netns`]: private network namespaces, for tests whose failure mode would send traffic
//!   somewhere other than loopback.
//! - [`topology`]: a client, a two-armed edge and a peer in network namespaces, for the XDP
//!   fast path's end-to-end tests; [`media`]: channel media between them and its accounting;
//!   [`bpf`]: a bpffs of the test's own, and the agent's pinned maps and links through
//!   `bpftool`.
//! - [`sip`]: real SIP peers for the SIP-over-TLS Access Edge: sipp callers and servers
//!   (through TLS bridges: Debian's sipp has no TLS), Kamailio as the reference TLS proxy,
//!   and a throughput measurement.
//! - [`ports`], [`tools`]: free ports and relay port ranges; external programs.
//!
//! Everything talks to loopback or to a namespace the test created, and every wait is
//! bounded.
//!
//! Running: `cargo test --workspace` (or `cargo build -p relay-user && cargo test -p
//! rampart-tests`: a test-only build does not rebuild the `rampart` binary). The interop
//! tests need coturn's tools and Python's aioice (`cargo xtask setup`); the namespace tests
//! need root and are skipped without it, except under `CI=true`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

pub mod access_edge;
pub mod bpf;
pub mod certs;
pub mod chromium;
pub mod client;
pub mod conferencing;
pub mod control;
pub mod coturn;
pub mod media;
pub mod netns;
pub mod ports;
pub mod process;
pub mod sip;
pub mod tools;
pub mod topology;

pub use client::{Allocated, Proto, Received, Response, TurnClient};
pub use process::{ControlLink, Rampart, RampartConfig, XdpConfig};

/// How long any single receive waits. Loopback answers in microseconds; this only bounds a
/// failing test.
pub const RECV_TIMEOUT: Duration = Duration::from_secs(5);

/// The static user every test configuration carries.
pub const USER: &str = "alice";
pub const PASSWORD: &str = "wonderland";
/// The realm every test configuration uses.
pub const REALM: &str = "rampart.test";
/// A TURN REST API shared secret (the server wants at least 16 characters).
pub const REST_SECRET: &str = "rampart-tests-rest-secret-0001";

/// TURN REST API credentials for `user` with `secret`, valid for `valid_for` from now:
/// `expiry:user` and base64(HMAC-SHA1(secret, username)).
pub fn rest_credentials(secret: &str, user: &str, valid_for: Duration) -> (String, String) {
    let expiry = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        + valid_for;
    let username = format!("{}:{user}", expiry.as_secs());
    let password = rampart_turn::auth::credentials::rest_password(secret.as_bytes(), &username);
    (username, password)
}

/// Where an IPv4 test peer lives: on loopback, but not on the server's own address. The
/// server refuses peers on its own addresses except at its relay ports (so the relay cannot
/// be pointed at other services of the edge host), and the test servers use 127.0.0.1.
pub const PEER_V4: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
/// Where an IPv6 test peer lives. The host's loopback has only ::1, the server's own
/// address, so IPv6 peers get a unique-local address on the loopback of a namespace the test
/// creates (see [`with_peer_address`]).
pub const PEER_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x7261, 0x6d70, 0, 0, 0, 0, 2);
/// The network of [`PEER_V6`], allowed in test configurations.
pub const PEER_V6_NET: &str = "fd00:7261:6d70::/48";

/// Runs `f` with the IP a test peer should bind. IPv4: 127.0.0.2, on the host's loopback.
/// IPv6: [`PEER_V6`], inside a fresh network namespace that `f` runs in (servers and
/// sockets `f` creates live there too). None when the namespace cannot be made (not root,
/// outside CI): the test is then skipped with a message.
pub fn with_peer_address<T: Send + 'static>(
    v6: bool,
    test: &str,
    f: impl FnOnce(IpAddr) -> T + Send + 'static,
) -> Option<T> {
    if !v6 {
        return Some(f(IpAddr::V4(PEER_V4)));
    }
    if !netns::can_create(test) {
        return None;
    }
    let ns = netns::Netns::create().expect("create a network namespace");
    ns.add_loopback_address(&format!("{PEER_V6}/128"))
        .expect("add the IPv6 peer address");
    Some(ns.run(move || f(IpAddr::V6(PEER_V6))))
}
