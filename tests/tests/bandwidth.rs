//! Bandwidth limits, `[limits] bandwidth_per_allocation` = 2 Mbit/s (burst 25 kB, its default),
//! on both of the agent's paths:
//!
//! - userspace, on loopback with the fast path off: a client offers ten times the limit for
//!   5 s, in 1000-byte ChannelData messages to a UDP peer, and the peer ten times the limit
//!   back; what arrives each way is the limit's worth within 10% (the rates are printed), and
//!   a flow at half the limit loses nothing;
//! - the kernel, on the two-armed edge of `rampart_tests::topology` with XDP native: the same
//!   flows, each way, relayed and cut by the XDP program (its `drop_over_limit` moves, the
//!   userspace relay's counters do not), and a flow at half the limit loses nothing there
//!   either. Needs root (namespaces, XDP); skipped with a message without it, except under CI;
//! - per user, from the control plane's policy: a user given half the limit is cut to it at
//!   once, on a live allocation, and ListAllocations reports each allocation's limit;
//! - the total, `[limits] bandwidth_total` = 2 Mbit/s and no per-allocation limit: two flows
//!   each offering ten times it at once get its worth together, within 10%, in userspace (two
//!   relay loops leasing from one pool) and in the kernel (each CPU's share, split again by
//!   demand every tenth of a second; the program's `drop_over_total` moves);
//! - a user's limit changed through the control plane on a live channel in the kernel: the
//!   binding is rewritten and the kernel cuts the flow to the new limit.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use proto::control::v1::operator_client::OperatorClient;
use proto::control::v1::{
    AccessPolicy, BandwidthLimit, BandwidthPolicy, ListAllocationsRequest, SetAccessPolicyRequest,
    UserBandwidth,
};
use rampart_tests::control::{
    ControlPki, ControlService, issue_credentials, runtime, temp_dir, wait_until,
};
use rampart_tests::media::{Flow, next_counters, number, slot, userspace_delta, xdp_delta};
use rampart_tests::netns::run_in;
use rampart_tests::ports::free_tcp_address;
use rampart_tests::topology::{EdgeTopology, SenderChecksums};
use rampart_tests::{PASSWORD, PEER_V4, Proto, Rampart, RampartConfig, Received, TurnClient, USER};
use rampart_turn::stun::AddressFamily;

const LIMIT_BITS: u64 = 2_000_000;
const MESSAGE: usize = 1000;
const CHANNEL: u16 = 0x4000;
const SECONDS: u64 = 5;
/// The senders' pace: `per_tick` messages every 10 ms.
const TICK: Duration = Duration::from_millis(10);

/// One test at a time: each measures rates in real time, on a machine of two cores.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Which way a flow goes.
#[derive(Clone, Copy, Debug)]
enum Way {
    ToPeer,
    ToClient,
}

/// An allocation with its channel to a peer socket.
struct Limited {
    client: TurnClient,
    peer: UdpSocket,
    relayed: SocketAddr,
}

impl Limited {
    /// Allocates for `username` with `client` and binds a channel to `peer`.
    fn allocate(
        mut client: TurnClient,
        username: &str,
        password: &str,
        peer: UdpSocket,
    ) -> Limited {
        let relayed = client
            .allocate(username, password, AddressFamily::V4)
            .unwrap()
            .relayed();
        client
            .channel_bind(CHANNEL, peer.local_addr().unwrap())
            .unwrap();
        Limited {
            client,
            peer,
            relayed,
        }
    }

    /// Sends `per_tick` messages every 10 ms for `seconds`, `way`, and counts what arrives
    /// until 500 ms after the last; (bytes sent, bytes received).
    fn offer(&mut self, way: Way, per_tick: usize, seconds: u64) -> (u64, u64) {
        let payload = vec![0x5a; MESSAGE];
        let quiet = Duration::from_millis(500);
        let Limited {
            client,
            peer,
            relayed,
        } = self;
        let relayed = *relayed;
        peer.set_read_timeout(Some(quiet)).unwrap();
        let peer = &*peer;
        match way {
            Way::ToPeer => paced(
                per_tick,
                seconds,
                || client.send_channel_data(CHANNEL, &payload).unwrap(),
                || peer.recv_from(&mut [0u8; 2048]).ok().map(|(n, _)| n),
            ),
            Way::ToClient => paced(
                per_tick,
                seconds,
                || {
                    peer.send_to(&payload, relayed).unwrap();
                },
                || match client.recv(quiet) {
                    Ok(Some(Received::Channel { data, .. })) => Some(data.len()),
                    _ => None,
                },
            ),
        }
    }
}

/// Calls `send` (one message) `per_tick` times every 10 ms for `seconds`, and `receive` in a
/// thread of its own until it returns None (quiet); (bytes sent, bytes received).
fn paced(
    per_tick: usize,
    seconds: u64,
    mut send: impl FnMut(),
    mut receive: impl FnMut() -> Option<usize> + Send,
) -> (u64, u64) {
    std::thread::scope(|scope| {
        let receiver = scope.spawn(move || {
            let mut received = 0u64;
            while let Some(n) = receive() {
                received += n as u64;
            }
            received
        });
        let start = Instant::now();
        let end = start + Duration::from_secs(seconds);
        let mut sent = 0u64;
        let mut next = start;
        while Instant::now() < end {
            for _ in 0..per_tick {
                send();
                sent += MESSAGE as u64;
            }
            // A sender held up (a busy machine) goes on from now rather than catching up in
            // one burst, which a flow under its limit would not send.
            next = (next + TICK).max(Instant::now());
            std::thread::sleep(next.saturating_duration_since(Instant::now()));
        }
        (sent, receiver.join().unwrap())
    })
}

/// Offers ten times [`LIMIT_BITS`] `way` for [`SECONDS`] and checks that `limit_bits`' worth,
/// and its default burst, arrived, within 10%.
fn ten_times_over_is_cut_to_the_limit(
    limited: &mut Limited,
    path: &str,
    way: Way,
    limit_bits: u64,
) {
    // 25 messages every 10 ms: 2.5 MB/s, ten times the 250 kB/s of LIMIT_BITS.
    let (sent, received) = limited.offer(way, 25, SECONDS);
    let burst = limit_bits / 80;
    let expected = limit_bits / 8 * SECONDS + burst;
    eprintln!(
        "bandwidth ({path}, {way:?}): offered {:.1} Mbit/s for {SECONDS} s, {:.3} Mbit/s \
         arrived (limit {:.1} Mbit/s, burst {burst} B)",
        sent as f64 * 8.0 / SECONDS as f64 / 1e6,
        received as f64 * 8.0 / SECONDS as f64 / 1e6,
        limit_bits as f64 / 1e6
    );
    let error = (received as f64 - expected as f64).abs() / expected as f64;
    assert!(
        error < 0.10,
        "{path}, {way:?}: {received} bytes arrived, expected {expected} within 10%"
    );
    assert!(
        sent >= 8 * expected,
        "the test offered too little ({sent} bytes) to be over the limit"
    );
}

/// Offers half the limit `way` for 3 s: nothing is lost.
fn under_the_limit_nothing_is_lost(limited: &mut Limited, path: &str, way: Way) {
    // 1 message every 10 ms: 100 kB/s, under half the limit.
    let (sent, received) = limited.offer(way, 1, 3);
    assert_eq!(
        received, sent,
        "{path}, {way:?}: a flow under the limit lost bytes"
    );
}

/// The agent on loopback with the fast path off, limited to [`LIMIT_BITS`].
fn loopback_config() -> RampartConfig {
    RampartConfig::single(Proto::Udp, false)
        .with_limit("bandwidth_per_allocation", &LIMIT_BITS.to_string())
        .with_stats_interval(1)
}

/// An allocation of `username` on `server`'s loopback listener, its channel to a new peer.
fn on_loopback(server: &Rampart, username: &str, password: &str) -> Limited {
    let client = server.client(Proto::Udp, false).unwrap();
    let peer = UdpSocket::bind(SocketAddr::new(IpAddr::V4(PEER_V4), 0)).unwrap();
    Limited::allocate(client, username, password, peer)
}

#[test]
fn in_userspace_a_flow_ten_times_over_its_limit_is_cut_to_it_each_way() {
    let _serial = one_at_a_time();
    let server = Rampart::start(&loopback_config()).unwrap();
    let mut limited = on_loopback(&server, USER, PASSWORD);
    for way in [Way::ToPeer, Way::ToClient] {
        ten_times_over_is_cut_to_the_limit(&mut limited, "userspace", way, LIMIT_BITS);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    let counted = |c: &serde_json::Value| c["relay"]["bandwidth_dropped"].as_u64() > Some(0);
    while !server.counters().last().is_some_and(counted) {
        assert!(Instant::now() < deadline, "no bandwidth_dropped counted");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn in_userspace_a_flow_under_its_limit_loses_nothing() {
    let _serial = one_at_a_time();
    let server = Rampart::start(&loopback_config()).unwrap();
    let mut limited = on_loopback(&server, USER, PASSWORD);
    for way in [Way::ToPeer, Way::ToClient] {
        under_the_limit_nothing_is_lost(&mut limited, "userspace", way);
    }
}

/// The limits ListAllocations reports, by user, once every allocation of `users` is listed
/// with the limit `expected` gives it.
fn listed_limits(
    rt: &tokio::runtime::Runtime,
    operator: &mut OperatorClient<tonic::transport::Channel>,
    expected: &[(&str, u64)],
) {
    wait_until(
        Duration::from_secs(10),
        "ListAllocations reports the limits",
        || {
            let listed = rt
                .block_on(operator.list_allocations(ListAllocationsRequest {
                    agent_id: String::new(),
                    user: String::new(),
                }))
                .unwrap()
                .into_inner()
                .allocations;
            expected.iter().all(|(user, limit)| {
                listed.iter().any(|a| {
                    a.allocation
                        .as_ref()
                        .is_some_and(|a| a.user == *user && a.bandwidth_limit_bps == *limit)
                })
            })
        },
    );
}

#[test]
fn per_user_limits_from_the_control_plane_apply_to_live_allocations() {
    let _serial = one_at_a_time();
    const SLOW: &str = "sip:slow@example.com";
    const OTHER: &str = "sip:other@example.com";
    let dir = temp_dir().unwrap();
    let pki = ControlPki::create(dir.path()).unwrap();
    let address = free_tcp_address(IpAddr::V4(Ipv4Addr::LOCALHOST)).unwrap();
    let _control =
        ControlService::start_reporting(&pki, &dir.path().join("control"), address, None, Some(1))
            .unwrap();
    let server = Rampart::start(&loopback_config().with_control(pki.agent_link(address))).unwrap();
    wait_until(
        Duration::from_secs(25),
        "the agent syncs with control",
        || server.log().contains("control snapshot applied"),
    );
    let rt = runtime();
    let mut front_end = rt.block_on(pki.front_end(address)).unwrap();
    let mut operator = rt.block_on(pki.operator(address)).unwrap();
    let (slow_name, slow_password) = issue_credentials(&rt, &mut front_end, SLOW);
    let (other_name, other_password) = issue_credentials(&rt, &mut front_end, OTHER);
    let mut slow = on_loopback(&server, &slow_name, &slow_password);
    let _other = on_loopback(&server, &other_name, &other_password);
    listed_limits(
        &rt,
        &mut operator,
        &[(SLOW, LIMIT_BITS), (OTHER, LIMIT_BITS)],
    );

    // The slow user gets half the configured limit, live; the others keep it.
    let half = LIMIT_BITS / 2;
    rt.block_on(front_end.set_access_policy(user_limit(SLOW, half)))
        .unwrap();
    listed_limits(&rt, &mut operator, &[(SLOW, half), (OTHER, LIMIT_BITS)]);
    ten_times_over_is_cut_to_the_limit(&mut slow, "userspace, per user", Way::ToPeer, half);
}

/// `user`'s limit set to `bits_per_second` through the front-end API (the rest unchanged:
/// the configured default).
fn user_limit(user: &str, bits_per_second: u64) -> SetAccessPolicyRequest {
    SetAccessPolicyRequest {
        policy: Some(AccessPolicy {
            bandwidth: Some(BandwidthPolicy {
                allocation_default: None,
                users: vec![UserBandwidth {
                    user: user.into(),
                    limit: Some(BandwidthLimit {
                        bits_per_second,
                        burst_bytes: 0,
                    }),
                }],
            }),
            ..Default::default()
        }),
    }
}

#[test]
fn in_the_kernel_a_per_user_limit_reaches_a_live_channel() {
    let _serial = one_at_a_time();
    let Some(topology) =
        EdgeTopology::create("bandwidth per user (xdp)", SenderChecksums::Complete)
            .expect("build the topology")
    else {
        return;
    };
    let dir = temp_dir().unwrap();
    let pki = ControlPki::create(dir.path()).unwrap();
    let address = free_tcp_address(IpAddr::V4(Ipv4Addr::LOCALHOST)).unwrap();
    let control = ControlService::start_in(
        &pki,
        &dir.path().join("control"),
        address,
        Some(topology.edge.name()),
    )
    .unwrap();
    let config = topology
        .agent_config("native")
        .with_limit("bandwidth_per_allocation", &LIMIT_BITS.to_string())
        .with_control(pki.agent_link(control.address));
    let (server, mut flows, mut before) = in_the_edge(&topology, &config, 1);
    wait_until(
        Duration::from_secs(25),
        "the agent syncs with control",
        || server.log().contains("control snapshot applied"),
    );
    // The front-end reaches control inside the edge's namespace.
    let rt = runtime();
    let mut front_end = run_in(topology.edge.name(), || {
        rt.block_on(pki.front_end(control.address))
    })
    .unwrap();
    // The static user's channel is in the kernel at the configured limit; the user is given
    // half of it, live: the binding in the kernel is rewritten with the new limit.
    let half = LIMIT_BITS / 2;
    rt.block_on(front_end.set_access_policy(user_limit(USER, half)))
        .unwrap();
    wait_until(Duration::from_secs(5), "the new limit applied", || {
        server.log().contains("bandwidth limits changed")
    });
    ten_times_over_is_cut_to_the_limit(&mut flows[0], "xdp, per user", Way::ToPeer, half);
    let (kernel, userspace) = counted_since(&server, &mut before);
    assert!(
        slot(&kernel, "drop_over_limit").packets > 0 && userspace.to_peer.packets <= 5,
        "the kernel did not police the new limit: {kernel:?}, userspace {userspace}"
    );
}

/// The agent started with `config` in the topology's edge, and `count` allocations from the
/// client host, each with its channel to a peer socket of its own on the internal host, in
/// the kernel; the counters line that says so.
fn in_the_edge(
    topology: &EdgeTopology,
    config: &RampartConfig,
    count: usize,
) -> (Rampart, Vec<Limited>, serde_json::Value) {
    let server = Rampart::start(config).expect("start rampart in the edge namespace");
    let listener = server.addr(Proto::Udp, topology.edge_external_ip(false));
    let (client_ip, host) = (topology.client_ip(false), topology.peer_ip(false));
    let flows: Vec<Limited> = (0..count)
        .map(|_| {
            let client = run_in(topology.client.name(), || {
                TurnClient::connect_udp(client_ip, listener)
            })
            .unwrap();
            let peer = run_in(topology.peer.name(), || UdpSocket::bind((host, 0))).unwrap();
            Limited::allocate(client, USER, PASSWORD, peer)
        })
        .collect();
    // The channels are in the kernel once a counters line says so. (A line is logged when
    // something changed: each is the one before the next flow.)
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut counters = next_counters(&server).unwrap();
    while number(&counters, &["fast_path", "channels_installed"]) < count as u64 {
        assert!(
            Instant::now() < deadline,
            "the channels never reached the kernel"
        );
        counters = next_counters(&server).unwrap();
    }
    (server, flows, counters)
}

/// What the XDP program, and the userspace relay, counted since `before`, which becomes the
/// latest counters line: once traffic stopped, everything the agent counted is in a line
/// logged within a second.
fn counted_since(
    server: &Rampart,
    before: &mut serde_json::Value,
) -> (std::collections::BTreeMap<String, (u64, u64)>, Flow) {
    std::thread::sleep(Duration::from_millis(1500));
    let after = server.counters().pop().expect("a counters line");
    let counted = (xdp_delta(before, &after), userspace_delta(before, &after));
    *before = after;
    counted
}

/// Every flow offers ten times [`LIMIT_BITS`] `way` at once for [`SECONDS`]: together they
/// get the total's worth, and its burst, within 10%.
///
/// Each flow's sender is pinned to a CPU of its own (round robin): the XDP program runs on
/// the CPU that sent into the veth, and the total's shares follow each CPU's demand, as they
/// follow a NIC's receive queues, each pinned to a CPU, on a real edge. A sender the scheduler
/// moves around at every wake-up would meet a share sized for another CPU's traffic.
fn together_held_to_the_total(flows: &mut [Limited], path: &str, way: Way) {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let results: Vec<(u64, u64)> = std::thread::scope(|scope| {
        let offers: Vec<_> = flows
            .iter_mut()
            .enumerate()
            .map(|(i, flow)| {
                scope.spawn(move || {
                    let mut only = nix::sched::CpuSet::new();
                    only.set(i % cpus).expect("a CPU of this machine");
                    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &only)
                        .expect("pinning a sender");
                    flow.offer(way, 25, SECONDS)
                })
            })
            .collect();
        offers.into_iter().map(|o| o.join().unwrap()).collect()
    });
    let received: u64 = results.iter().map(|(_, r)| r).sum();
    let expected = LIMIT_BITS / 8 * SECONDS + LIMIT_BITS / 80;
    eprintln!(
        "bandwidth ({path}, total, {way:?}): {} flows each offered {:.1} Mbit/s for {SECONDS} s, \
         together {:.3} Mbit/s arrived ({}; total {:.1} Mbit/s)",
        flows.len(),
        results[0].0 as f64 * 8.0 / SECONDS as f64 / 1e6,
        received as f64 * 8.0 / SECONDS as f64 / 1e6,
        results
            .iter()
            .map(|(_, r)| format!("{:.3}", *r as f64 * 8.0 / SECONDS as f64 / 1e6))
            .collect::<Vec<_>>()
            .join(" + "),
        LIMIT_BITS as f64 / 1e6
    );
    let error = (received as f64 - expected as f64).abs() / expected as f64;
    assert!(
        error < 0.10,
        "{path}, total, {way:?}: {received} bytes arrived, expected {expected} within 10%"
    );
}

#[test]
fn in_userspace_flows_together_are_held_to_the_total() {
    let _serial = one_at_a_time();
    let config = RampartConfig::single(Proto::Udp, false)
        .with_limit("bandwidth_total", &LIMIT_BITS.to_string())
        .with_relay_setting("loops", "2");
    let server = Rampart::start(&config).unwrap();
    let mut flows: Vec<Limited> = (0..2)
        .map(|_| on_loopback(&server, USER, PASSWORD))
        .collect();
    for way in [Way::ToPeer, Way::ToClient] {
        together_held_to_the_total(&mut flows, "userspace", way);
    }
}

#[test]
fn in_the_kernel_flows_together_are_held_to_the_total() {
    let _serial = one_at_a_time();
    let Some(topology) = EdgeTopology::create("bandwidth total (xdp)", SenderChecksums::Complete)
        .expect("build the topology")
    else {
        return;
    };
    let config = topology
        .agent_config("native")
        .with_limit("bandwidth_total", &LIMIT_BITS.to_string());
    let (server, mut flows, mut before) = in_the_edge(&topology, &config, 2);
    for way in [Way::ToPeer, Way::ToClient] {
        together_held_to_the_total(&mut flows, "xdp", way);
        let (kernel, _) = counted_since(&server, &mut before);
        let dropped = slot(&kernel, "drop_over_total");
        eprintln!(
            "bandwidth (xdp, total, {way:?}): the kernel dropped {} datagrams over the total",
            dropped.packets
        );
        assert!(
            dropped.packets > 0,
            "the kernel did not police the total: {kernel:?}"
        );
    }
}

#[test]
fn in_the_kernel_a_flow_over_its_limit_is_cut_to_it_and_one_under_it_loses_nothing() {
    let _serial = one_at_a_time();
    let Some(topology) = EdgeTopology::create("bandwidth (xdp)", SenderChecksums::Complete)
        .expect("build the topology")
    else {
        return;
    };
    let config = topology
        .agent_config("native")
        .with_limit("bandwidth_per_allocation", &LIMIT_BITS.to_string());
    let (server, mut flows, mut before) = in_the_edge(&topology, &config, 1);
    let limited = &mut flows[0];

    for way in [Way::ToPeer, Way::ToClient] {
        ten_times_over_is_cut_to_the_limit(limited, "xdp", way, LIMIT_BITS);
        under_the_limit_nothing_is_lost(limited, "xdp", way);
        let (kernel, userspace) = counted_since(&server, &mut before);
        let forwarded = match way {
            Way::ToPeer => "forwarded_to_peer",
            Way::ToClient => "forwarded_to_client",
        };
        let (dropped, forwarded) = (slot(&kernel, "drop_over_limit"), slot(&kernel, forwarded));
        eprintln!(
            "bandwidth (xdp, {way:?}): the kernel forwarded {} and dropped {} datagrams over \
             the limit; userspace relayed {}",
            forwarded.packets, dropped.packets, userspace
        );
        assert!(
            dropped.packets > 0 && forwarded.packets > 0,
            "the kernel did not police the flow: {kernel:?}"
        );
        let relayed_in_userspace = match way {
            Way::ToPeer => userspace.to_peer,
            Way::ToClient => userspace.to_client,
        };
        assert!(
            relayed_in_userspace.packets <= 5,
            "the flow went through userspace ({relayed_in_userspace:?}), not the kernel"
        );
    }
}
