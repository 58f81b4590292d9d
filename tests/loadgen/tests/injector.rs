//! The instrument alone: frames injected with `BPF_PROG_RUN` in live-frames mode on one host's
//! veth arrive on the other host's, where the counter counts every one of them, per flow, in
//! sequence; with the counter passing them instead, the receiving stack accepts every one
//! (valid IPv4 and UDP checksums: relays that verify them must not be handicapped) and a
//! socket reads the stamps the injector wrote.

use std::net::{Ipv4Addr, UdpSocket};
use std::time::Duration;

use loadgen_common::{FlowStats, InjectFlow, TO_CLIENT, TO_PEER, per_direction};
use rampart_loadgen::payload::{Direction, Header};
use rampart_loadgen::xdp::{Counters, Injector, injector_refused};
use rampart_tests::netns::{self, Netns};

const A_MAC: [u8; 6] = [0x02, 0, 0, 0, 0xa, 1];
const B_MAC: [u8; 6] = [0x02, 0, 0, 0, 0xb, 1];

/// Each flow's ChannelData side from port 20000 + i, its plain UDP side from 30000 + i.
fn flows_of(count: u16) -> Vec<[InjectFlow; 2]> {
    let side = |src_port| InjectFlow {
        src_mac: A_MAC,
        dst_mac: B_MAC,
        src_ip: Ipv4Addr::new(10, 203, 0, 1).octets(),
        dst_ip: Ipv4Addr::new(10, 203, 0, 2).octets(),
        src_port,
        dst_port: 3478,
        channel: 0x4000,
        _pad: [0; 2],
    };
    (0..count)
        .map(|i| [side(20_000 + i), side(30_000 + i)])
        .collect()
}

/// The injector for `flows`, sending both directions out of a0 (in `a`).
fn injector_on(a: &Netns, flows: &[[InjectFlow; 2]], payload: usize) -> Injector {
    let mut injector = Injector::new(flows, payload).unwrap();
    netns::run_in(a.name(), || -> anyhow::Result<()> {
        injector.set_ingress("a0")?;
        injector.set_egress(TO_PEER, "a0")?;
        injector.set_egress(TO_CLIENT, "a0")
    })
    .unwrap();
    injector
}

#[test]
fn every_injected_frame_is_counted_once_per_flow_in_sequence() {
    if !netns::can_create("every_injected_frame_is_counted_once_per_flow_in_sequence") {
        return;
    }
    let a = Netns::create().unwrap();
    let b = Netns::create().unwrap();
    a.ip(&[
        "link",
        "add",
        "a0",
        "address",
        "02:00:00:00:0a:01",
        "type",
        "veth",
        "peer",
        "name",
        "b0",
        "address",
        "02:00:00:00:0b:01",
        "netns",
        b.name(),
    ])
    .unwrap();
    a.ip(&["link", "set", "a0", "up"]).unwrap();
    b.ip(&["link", "set", "b0", "up"]).unwrap();

    let mut counters = Counters::load().unwrap();
    netns::run_in(b.name(), || counters.attach("b0")).unwrap();
    let seven = flows_of(7);
    let mut injector = injector_on(&a, &seven, 160);
    // Some kernels refuse live-frames mode (see the harness test): nothing to count there. The
    // probe's frame belongs to no step, and is gone before the counts start.
    if let Err(error) = netns::run_in(a.name(), || injector.inject(1))
        && injector_refused(&format!("{error:#}"))
    {
        eprintln!("SKIPPED: this kernel refuses BPF_PROG_RUN in live-frames mode: {error:#}");
        return;
    }
    std::thread::sleep(Duration::from_millis(50));
    counters.start_step(1, 7).unwrap();
    injector.start_step(1, None).unwrap();
    netns::run_in(a.name(), || -> anyhow::Result<()> {
        // Paced gently: the receiving ring holds 256 frames.
        for _ in 0..100 {
            injector.inject(200)?;
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok(())
    })
    .unwrap();
    let sent = injector.stamped().unwrap();
    assert_eq!(sent, 20_000);
    std::thread::sleep(Duration::from_millis(200));
    let counted = counters.read(7).unwrap();
    let mut delivered = 0;
    for (direction, direction_sent) in per_direction(sent).into_iter().enumerate() {
        assert_eq!(direction_sent, 10_000);
        for flow in 0..7u64 {
            let stats: FlowStats = counted.flows[flow as usize * 2 + direction];
            let flow_sent = direction_sent / 7 + u64::from(flow < direction_sent % 7);
            assert_eq!(
                stats.lost(flow_sent),
                Some(0),
                "direction {direction}, flow {flow}: {stats:?}"
            );
            assert_eq!((stats.reordered, stats.duplicates), (0, 0), "{stats:?}");
            delivered += stats.delivered;
        }
    }
    assert_eq!(delivered, sent);
    assert_eq!(counted.latency.iter().sum::<u64>(), sent);

    // Paced by the program: a rate, and a call that runs until the thread is signalled.
    counters.start_step(2, 7).unwrap();
    injector.start_step(2, Some(20_000.0)).unwrap();
    let stopped = netns::run_in(a.name(), || {
        rampart_loadgen::injection::inject_for(&injector, Duration::from_millis(500))
    });
    stopped.unwrap();
    let paced = injector.stamped().unwrap();
    // 20 000 per second for half a second, give or take the start and the stop.
    assert!((8_000..=12_000).contains(&paced), "{paced} frames");
    std::thread::sleep(Duration::from_millis(200));
    let counted = counters.read(7).unwrap();
    let delivered: u64 = counted.flows.iter().map(|f| f.delivered).sum();
    assert_eq!(delivered, paced);

    // Counting nothing, the counter passes every frame to the stack.
    counters.start_step(0, 0).unwrap();
    b.ip(&["addr", "add", "10.203.0.2/24", "dev", "b0"])
        .unwrap();
    let socket = netns::run_in(b.name(), || UdpSocket::bind("10.203.0.2:3478")).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    // Each datagram holds a page of the injector's pool: room for all of them.
    nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::RcvBufForce, &(4 << 20))
        .unwrap();
    let three = flows_of(3);
    let mut injector = injector_on(&a, &three, 200);
    injector.start_step(3, None).unwrap();
    netns::run_in(a.name(), || injector.inject(180)).unwrap();
    let mut buf = [0u8; 2048];
    // Frames alternate: ChannelData of flow i, then plain UDP of flow i, then flow i + 1.
    for n in 0..180u64 {
        let (to_peer, i) = (n % 2 == 0, n / 2);
        let (len, from) = socket
            .recv_from(&mut buf)
            .unwrap_or_else(|e| panic!("datagram {n} of 180 not received: {e}"));
        let base = if to_peer { 20_000 } else { 30_000 };
        assert_eq!(from.port(), base + (i % 3) as u16);
        let payload = if to_peer {
            assert_eq!(&buf[..2], &[0x40, 0x00], "channel number");
            assert_eq!(
                u16::from_be_bytes([buf[2], buf[3]]),
                200,
                "ChannelData length"
            );
            &buf[4..len]
        } else {
            &buf[..len]
        };
        assert_eq!(payload.len(), 200);
        let header = Header::read(payload).expect("a stamp");
        assert_eq!(
            (header.step, header.flow, header.seq),
            (3, (i % 3) as u32, i / 3)
        );
        let expected = if to_peer {
            Direction::ToPeer
        } else {
            Direction::ToClient
        };
        assert_eq!(header.direction, expected);
    }
    let snmp = std::process::Command::new("ip")
        .args(["netns", "exec", b.name(), "cat", "/proc/net/snmp"])
        .output()
        .unwrap();
    let snmp = String::from_utf8_lossy(&snmp.stdout).into_owned();
    assert_eq!(udp_counter(&snmp, "InCsumErrors"), 0, "{snmp}");
    assert_eq!(udp_counter(&snmp, "InDatagrams"), 180, "{snmp}");
}

/// A counter of the `Udp:` lines of /proc/net/snmp.
fn udp_counter(snmp: &str, name: &str) -> u64 {
    let mut lines = snmp.lines().filter(|l| l.starts_with("Udp:"));
    let (names, values) = (lines.next().unwrap(), lines.next().unwrap());
    let index = names.split_whitespace().position(|n| n == name).unwrap();
    values
        .split_whitespace()
        .nth(index)
        .unwrap()
        .parse()
        .unwrap()
}
