//! The embedded XDP program loads, attaches and counts.
//!
//! The test creates a network namespace of its own, attaches the program (generic/SKB mode) to
//! that namespace's loopback from a thread that has entered it, sends a few UDP datagrams to
//! 127.0.0.1 there, and checks the counters, then that detaching stops the counting. The host's
//! interfaces are never touched and no traffic leaves the namespace.
//!
//! Needs root. Without root it is skipped with a message, except under CI (`CI=true`), where it
//! fails: CI must exercise the real kernel path.

use std::{
    fs::File,
    net::UdpSocket,
    process::Command,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use nix::{
    sched::{CloneFlags, setns},
    unistd::Uid,
};
use rampart_xdp::{Counter, Stat, XdpMode, XdpProgram};

const DATAGRAMS: u64 = 5;
const PAYLOAD: &[u8] = b"rampart xdp load test";
/// Ethernet + IPv4 + UDP headers: the least a datagram adds to the payload on loopback.
const HEADERS: u64 = 14 + 20 + 8;

#[test]
fn xdp_program_counts_loopback_datagrams_in_its_own_netns() {
    if !Uid::effective().is_root() {
        let why = "xdp_load needs root (CAP_BPF, CAP_NET_ADMIN, and `ip netns add`)";
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("{why}, and CI=true: CI must run it as root");
        }
        eprintln!(
            "\n*** SKIPPED xdp_program_counts_loopback_datagrams_in_its_own_netns: {why} ***\n"
        );
        return;
    }

    let netns = Netns::create();
    let path = format!("/run/netns/{}", netns.name);
    let ns_name = netns.name.clone();
    // Network namespaces are per thread: this thread enters it, the test's thread stays put.
    let outcome = std::thread::spawn(move || -> Result<(), String> {
        let ns = File::open(&path).map_err(|e| format!("opening {path}: {e}"))?;
        setns(&ns, CloneFlags::CLONE_NEWNET).map_err(|e| format!("setns({path}): {e}"))?;
        exercise(&ns_name)
    })
    .join()
    .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
    if let Err(problem) = outcome {
        panic!("{problem}");
    }
}

/// Runs inside the test namespace.
fn exercise(ns_name: &str) -> Result<(), String> {
    let mut xdp = XdpProgram::load().map_err(report)?;
    assert_eq!(
        seen(&xdp)?,
        Counter::default(),
        "fresh counters must be zero"
    );

    xdp.attach("lo", XdpMode::Skb).map_err(report)?;
    assert!(xdp.is_attached("lo"));
    let link = ip(&["-n", ns_name, "link", "show", "dev", "lo"]);
    assert!(
        link.contains("xdp"),
        "`ip link` shows no XDP program on lo:\n{link}"
    );

    exchange(DATAGRAMS)?;
    let attached = seen(&xdp)?;
    assert!(
        attached.packets >= DATAGRAMS,
        "sent {DATAGRAMS} datagrams over lo, counted {attached:?}"
    );
    assert!(
        attached.bytes >= DATAGRAMS * (HEADERS + PAYLOAD.len() as u64),
        "byte count too small: {attached:?}"
    );

    eprintln!("counted while attached: {attached:?}");

    xdp.detach("lo").map_err(report)?;
    assert!(!xdp.is_attached("lo"));
    let link = ip(&["-n", ns_name, "link", "show", "dev", "lo"]);
    assert!(
        !link.contains("xdp"),
        "lo still has an XDP program after detach:\n{link}"
    );
    exchange(DATAGRAMS)?;
    assert_eq!(
        seen(&xdp)?,
        attached,
        "the program counted after it was detached"
    );
    Ok(())
}

fn seen(xdp: &XdpProgram) -> Result<Counter, String> {
    xdp.counter(Stat::Seen).map_err(report)
}

/// Sends `count` datagrams from one loopback socket to another and waits for all of them, so
/// they have been through the receive path (where XDP runs) when this returns.
fn exchange(count: u64) -> Result<(), String> {
    let io = |what: &str, e: std::io::Error| format!("{what}: {e}");
    let rx = UdpSocket::bind("127.0.0.1:0").map_err(|e| io("bind receiver", e))?;
    rx.set_read_timeout(Some(Duration::from_secs(2)))
        .map_err(|e| io("set_read_timeout", e))?;
    let tx = UdpSocket::bind("127.0.0.1:0").map_err(|e| io("bind sender", e))?;
    let to = rx.local_addr().map_err(|e| io("local_addr", e))?;
    let mut buf = [0u8; 64];
    for _ in 0..count {
        tx.send_to(PAYLOAD, to).map_err(|e| io("send_to", e))?;
        let (n, _) = rx.recv_from(&mut buf).map_err(|e| io("recv_from", e))?;
        assert_eq!(&buf[..n], PAYLOAD);
    }
    Ok(())
}

fn report(e: rampart_xdp::XdpError) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(cause) = source {
        text.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    text
}

/// Runs `ip` and returns its stdout; panics with its stderr if it fails.
fn ip(args: &[&str]) -> String {
    let out = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running `ip` (package iproute2; `cargo xtask setup`): {e}"));
    assert!(
        out.status.success(),
        "`ip {}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A network namespace that exists for the life of the value.
struct Netns {
    name: String,
}

impl Netns {
    fn create() -> Self {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let name = format!("rampart-xdp-{}-{nanos}", std::process::id());
        ip(&["netns", "add", &name]);
        let netns = Self { name };
        ip(&["-n", &netns.name, "link", "set", "lo", "up"]);
        netns
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}
