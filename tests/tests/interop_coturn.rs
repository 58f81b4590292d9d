//! Interoperability with coturn's test tools, TURN/STUN clients we did not write.
//!
//! `turnutils_uclient` allocates, binds channels (or uses Send indications with `-s`) and
//! sends `-n` messages per client through the relay to `turnutils_peer`, which echoes them
//! back; at the end it prints totals, e.g.
//!
//! ```text
//! 5: : start_mclient: tot_send_msgs=40, tot_recv_msgs=40
//! 5: : Total lost packets 0 (0.000000%), total send dropped 0 (0.000000%)
//! ```
//!
//! which the tests parse. Flags used (coturn 4.6): `-u/-w` static user, `-W` TURN REST API
//! secret (uclient mints `expiry:user` itself, expiry = now + 86400 s), `-e/-r` peer address
//! and port, `-n` messages per client, `-m` clients, `-l` message length, `-c` no RTCP
//! companion allocation, `-t` TCP, `-S` TLS, `-s` Send indications instead of channels, `-y`
//! client to client (each client's peer is another client's relayed address, no echo peer),
//! `-x` IPv6 relay, `-X` IPv4 relay, `-p` server port; the server address is the last
//! argument.
//!
//! A missing tool fails the test with the command that installs it.

use std::net::{IpAddr, SocketAddr};
use std::process::Command;
use std::time::{Duration, Instant};

use rampart_tests::client::loopback;
use rampart_tests::tools;
use rampart_tests::{
    PASSWORD, PEER_V4, Proto, REST_SECRET, Rampart, RampartConfig, USER, with_peer_address,
};

use rampart_tests::coturn::{
    EchoPeer, INSTALL_HINT, MESSAGES, Totals, assert_all_echoed, run_uclient, totals, uclient,
};

/// Every uclient client makes a probe allocation it never deletes besides the ones it uses,
/// so several runs need more than the default quota of 10 per user.
fn config(listeners: &[(Proto, IpAddr)]) -> RampartConfig {
    RampartConfig::loopback(listeners).with_limit("allocations_per_user", "100")
}

#[test]
fn udp_channels_static_user() {
    let server = Rampart::start(&config(&[(Proto::Udp, loopback(false))])).unwrap();
    let peer = EchoPeer::start(IpAddr::V4(PEER_V4));
    let run = uclient(
        &server,
        Proto::Udp,
        &peer,
        &["-u", USER, "-w", PASSWORD, "-m", "2", "-l", "160"],
    );
    assert_all_echoed(&run, 2 * MESSAGES);
}

#[test]
fn udp_send_indications() {
    let server = Rampart::start(&config(&[(Proto::Udp, loopback(false))])).unwrap();
    let peer = EchoPeer::start(IpAddr::V4(PEER_V4));
    let run = uclient(
        &server,
        Proto::Udp,
        &peer,
        &["-s", "-X", "-u", USER, "-w", PASSWORD, "-m", "2"],
    );
    assert_all_echoed(&run, 2 * MESSAGES);
}

#[test]
fn tcp_channels() {
    let server = Rampart::start(&config(&[(Proto::Tcp, loopback(false))])).unwrap();
    let peer = EchoPeer::start(IpAddr::V4(PEER_V4));
    let run = uclient(
        &server,
        Proto::Tcp,
        &peer,
        &["-t", "-u", USER, "-w", PASSWORD, "-m", "2", "-l", "333"],
    );
    assert_all_echoed(&run, 2 * MESSAGES);
}

#[test]
fn tls_channels() {
    let server = Rampart::start(&config(&[(Proto::Tls, loopback(false))])).unwrap();
    let peer = EchoPeer::start(IpAddr::V4(PEER_V4));
    let ca = server.ca_pem_path().expect("TLS server has a CA");
    let ca = ca.to_str().expect("UTF-8 temp path");
    let run = uclient(
        &server,
        Proto::Tls,
        &peer,
        &["-t", "-S", "-E", ca, "-u", USER, "-w", PASSWORD, "-m", "2"],
    );
    assert_all_echoed(&run, 2 * MESSAGES);
}

#[test]
fn rest_api_credentials() {
    let server = Rampart::start(&config(&[(Proto::Udp, loopback(false))])).unwrap();
    let peer = EchoPeer::start(IpAddr::V4(PEER_V4));
    let run = uclient(
        &server,
        Proto::Udp,
        &peer,
        &["-W", REST_SECRET, "-u", "rest-user", "-m", "2"],
    );
    assert_all_echoed(&run, 2 * MESSAGES);
    let log = server.log();
    assert!(
        log.lines()
            .any(|l| l.contains("allocation created") && l.contains(":rest-user")),
        "the allocations must be made under a REST API username (`expiry:rest-user`)"
    );
}

/// The embedded default configuration's start-up banner suggests `-y`: each client's peer
/// is another client's relayed address, so data goes relay to relay on the server's own
/// address, which the peer policy allows at relay ports only.
#[test]
fn client_to_client() {
    let server = Rampart::start(&config(&[(Proto::Udp, loopback(false))])).unwrap();
    let addr = server.loopback_addr(Proto::Udp, false);
    let port = addr.port().to_string();
    let host = addr.ip().to_string();
    let n = MESSAGES.to_string();
    let run = run_uclient(&[
        "-y", "-c", "-u", USER, "-w", PASSWORD, "-n", &n, "-p", &port, &host,
    ]);
    // -y runs the clients in pairs: two clients, each sending -n messages.
    assert_all_echoed(&run, 2 * MESSAGES);
}

/// IPv6 relay (-x) to an IPv6 peer. The peer needs an address that is not the server's own
/// (the host has only ::1), so this runs in a namespace of its own.
#[test]
fn ipv6_relay() {
    with_peer_address(true, "interop_coturn::ipv6_relay", |peer_ip| {
        let server = Rampart::start(&config(&[(Proto::Udp, loopback(true))])).unwrap();
        let peer = EchoPeer::start(peer_ip);
        let run = uclient(
            &server,
            Proto::Udp,
            &peer,
            &["-x", "-u", USER, "-w", PASSWORD, "-m", "2"],
        );
        assert_all_echoed(&run, 2 * MESSAGES);
    });
}

/// A run that cannot allocate must fail: proves the passing runs above are not vacuous.
#[test]
fn wrong_password_is_refused() {
    let server = Rampart::start(&config(&[(Proto::Udp, loopback(false))])).unwrap();
    let peer = EchoPeer::start(IpAddr::V4(PEER_V4));
    let run = uclient(
        &server,
        Proto::Udp,
        &peer,
        &["-u", USER, "-w", "not-the-password"],
    );
    assert!(
        !run.status.success() && run.output().contains("Cannot complete Allocation"),
        "uclient with a wrong password must fail to allocate\n{}",
        run.output()
    );
}

/// `turnutils_stunclient` sends a Binding request; the reflexive address it prints must be
/// its own loopback address. Its port is not printed elsewhere, so the check is that it is
/// a client port (not the server's, and non-zero) and that two lines agree.
#[test]
fn stun_binding_with_stunclient() {
    let stunclient = tools::require("turnutils_stunclient", INSTALL_HINT);
    let server = Rampart::start(&config(&[(Proto::Udp, loopback(false))])).unwrap();
    let addr = server.loopback_addr(Proto::Udp, false);
    let run = tools::run_bounded(
        Command::new(stunclient)
            .args(["-L", "127.0.0.1", "-p", &addr.port().to_string()])
            .arg(addr.ip().to_string()),
        Duration::from_secs(10),
    )
    .unwrap();
    assert!(run.status.success(), "{}", run.output());
    let reflexive: Vec<SocketAddr> = run
        .stdout
        .lines()
        .filter_map(|l| l.split("UDP reflexive addr: ").nth(1))
        .map(|a| a.trim().parse().expect("a socket address"))
        .collect();
    assert!(
        !reflexive.is_empty(),
        "no reflexive address\n{}",
        run.output()
    );
    for mapped in &reflexive {
        assert_eq!(mapped.ip(), loopback(false), "{}", run.output());
        assert!(
            mapped.port() != 0 && mapped.port() != addr.port(),
            "{}",
            run.output()
        );
        assert_eq!(*mapped, reflexive[0], "{}", run.output());
    }
}

/// `turnutils_peer` on `ip`: echoes every datagram back to its sender.
#[test]
fn totals_parse_uclient_output() {
    let output = "\
1: : start_mclient: msz=2, tot_send_msgs=0, tot_recv_msgs=0, tot_send_bytes ~ 0, tot_recv_bytes ~ 0
5: : start_mclient: tot_send_msgs=40, tot_recv_msgs=39
5: : start_mclient: tot_send_bytes ~ 4000, tot_recv_bytes ~ 3900
5: : Total lost packets 1 (2.500000%), total send dropped 0 (0.000000%)
";
    assert_eq!(
        totals(output).unwrap(),
        Totals {
            sent: 40,
            received: 39,
            lost: 1,
            send_dropped: 0
        }
    );
}

/// TCP allocations (RFC 6062) with `-T` and 4 clients: every client Connects to every
/// other client's relayed address through its own allocation, the other is told by a
/// ConnectionAttempt, and each side joins its end with a ConnectionBind on a new connection;
/// the messages then pass as raw bytes, relay to relay on the server's own address. Returns
/// uclient's run and the edge's last counters once every connection has closed.
fn tcp_relay(proto: Proto, extra: &[&str]) -> (tools::Finished, serde_json::Value) {
    let server = Rampart::start(
        &config(&[(proto, loopback(false))])
            .with_limit("connections_per_source", "1000")
            .with_stats_interval(1),
    )
    .unwrap();
    let addr = server.loopback_addr(proto, false);
    let port = addr.port().to_string();
    let host = addr.ip().to_string();
    let n = MESSAGES.to_string();
    let length = TCP_MESSAGE.to_string();
    let mut args = vec![
        "-T", "-u", USER, "-w", PASSWORD, "-m", "4", "-l", &length, "-n", &n, "-p", &port,
    ];
    args.extend_from_slice(extra);
    args.push(&host);
    let run = run_uclient(&args);
    assert!(run.status.success(), "{}", run.output());
    // Bytes are counted when a data connection ends.
    let closed = |c: &serde_json::Value| c["allocations"] == 0;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !server.counters().last().is_some_and(closed) {
        assert!(
            Instant::now() < deadline,
            "the edge still counts allocations 10 s after uclient ended: {:?}",
            server.counters().last()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let counters = server.counters().pop().expect("a counters line");
    (run, counters)
}

/// uclient's `-l` in the TCP relay tests.
const TCP_MESSAGE: u64 = 170;

fn relayed_each_way(counters: &serde_json::Value) -> (Option<u64>, Option<u64>) {
    (
        counters["relay"]["to_peer_bytes"].as_u64(),
        counters["relay"]["to_client_bytes"].as_u64(),
    )
}

fn assert_client_to_client(run: &tools::Finished, counters: &serde_json::Value) {
    assert!(
        run.output().contains("12 connections are completed"),
        "each of the 4 clients has a connection with each other one\n{}",
        run.output()
    );
    assert_all_echoed(run, 4 * MESSAGES);
    let relay = &counters["relay"];
    assert_eq!(
        relay["peer_connections_connected"].as_u64(),
        Some(6),
        "{counters}"
    );
    assert_eq!(
        relay["peer_connections_accepted"].as_u64(),
        Some(6),
        "{counters}"
    );
    assert_eq!(
        relay["peer_connections_bound"].as_u64(),
        Some(12),
        "{counters}"
    );
    // Each message crosses the edge once each way: from its sender's data connection out of
    // a peer connection (to_peer), and into the other allocation's peer connection and on
    // to its client (to_client).
    let each_way = 4 * MESSAGES * TCP_MESSAGE;
    assert_eq!(
        relayed_each_way(counters),
        (Some(each_way), Some(each_way)),
        "{counters}"
    );
}

#[test]
fn tcp_relay_client_to_client() {
    let (run, counters) = tcp_relay(Proto::Tcp, &[]);
    assert_client_to_client(&run, &counters);
}

#[test]
fn tcp_relay_over_tls() {
    // uclient also tries older TLS versions first, which the edge refuses (counted as
    // handshake failures: "SignatureAlgorithmsExtensionRequired").
    let (run, counters) = tcp_relay(Proto::Tls, &["-S"]);
    assert_client_to_client(&run, &counters);
}

/// `-P`: in each pair one client is a plain TCP peer that connects in to the other's relayed
/// address, which learns of it by ConnectionAttempt. The peers connect from uclient's local
/// address (`-L`): not the server's own, which the peer policy refuses outside relay ports.
///
/// In this mode uclient counts only one side's messages as received and reports the other
/// half "lost", against coturn's own server too (turnserver 4.6, same command: "Total lost
/// packets 5 (50.000000%)" for `-m 2 -n 5`); so what is checked is that the edge relayed
/// every byte both ways.
#[test]
fn tcp_relay_peers_connecting_in() {
    let (run, counters) = tcp_relay(Proto::Tcp, &["-P", "-L", "127.0.0.2"]);
    let totals = totals(&run.stdout)
        .or_else(|_| totals(&run.stderr))
        .unwrap_or_else(|e| panic!("{e:#}\n{}", run.output()));
    assert_eq!(totals.sent, 4 * MESSAGES, "{}", run.output());
    let relay = &counters["relay"];
    assert_eq!(
        relay["peer_connections_accepted"].as_u64(),
        Some(2),
        "{counters}"
    );
    assert_eq!(
        relay["peer_connections_bound"].as_u64(),
        Some(2),
        "{counters}"
    );
    let each_way = 2 * MESSAGES * TCP_MESSAGE;
    assert_eq!(
        relayed_each_way(&counters),
        (Some(each_way), Some(each_way)),
        "{counters}"
    );
}
