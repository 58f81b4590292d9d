//! The instrument alone: frames injected with `BPF_PROG_RUN` in live-frames mode on one host's
//! veth arrive on the other host's, where the counter counts every one of them, per flow, in
//! sequence; with the counter passing them instead, the receiving stack accepts every one
//! (valid IPv4 and UDP checksums: relays that verify them must not be handicapped) and a
//! socket reads the stamps the injector wrote.

use std::net::{Ipv4Addr, UdpSocket};
use std::time::Duration;

use loadgen_common::{FlowStats, InjectFlow, TO_CLIENT, TO_PEER};
use rampart_loadgen::payload::{Direction, Header};
use rampart_loadgen::xdp::{Counters, Injector};
use rampart_tests::netns::{self, Netns};

const A_MAC: [u8; 6] = [0x02, 0, 0, 0, 0xa, 1];
const B_MAC: [u8; 6] = [0x02, 0, 0, 0, 0xb, 1];

fn flows(count: u16) -> Vec<InjectFlow> {
    (0..count)
        .map(|i| InjectFlow {
            src_mac: A_MAC,
            dst_mac: B_MAC,
            src_ip: Ipv4Addr::new(10, 203, 0, 1).octets(),
            dst_ip: Ipv4Addr::new(10, 203, 0, 2).octets(),
            src_port: 20_000 + i,
            dst_port: 3478,
            channel: 0x4000,
            _pad: [0; 2],
        })
        .collect()
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
    for (direction, step) in [(TO_PEER, 1), (TO_CLIENT, 2)] {
        let flows = flows(7);
        let sent = netns::run_in(a.name(), || -> anyhow::Result<u64> {
            let mut injector = Injector::new("a0", direction, &flows, 160)?;
            counters.start_step(step, injector.flows())?;
            injector.start_step(step)?;
            // Paced gently: the receiving ring holds 256 frames.
            for _ in 0..100 {
                injector.inject(100)?;
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            injector.stamped()
        })
        .unwrap();
        assert_eq!(sent, 10_000);
        std::thread::sleep(std::time::Duration::from_millis(200));
        let counted = counters.read(7).unwrap();
        let per_flow_sent = |flow: u64| sent / 7 + u64::from(flow < sent % 7);
        let mut delivered = 0;
        for flow in 0..7u64 {
            let stats: FlowStats = counted.flows[(flow * 2 + u64::from(direction)) as usize];
            assert_eq!(
                stats.lost(per_flow_sent(flow)),
                Some(0),
                "direction {direction}, flow {flow}: {stats:?}"
            );
            assert_eq!((stats.reordered, stats.duplicates), (0, 0), "{stats:?}");
            delivered += stats.delivered;
            // Nothing was counted in the other direction.
            let other = counted.flows[(flow * 2 + u64::from(1 - direction)) as usize];
            assert_eq!(other.delivered, 0);
        }
        assert_eq!(delivered, sent);
        assert_eq!(counted.latency.iter().sum::<u64>(), sent);
    }

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
    for (direction, step) in [(TO_PEER, 3), (TO_CLIENT, 4)] {
        netns::run_in(a.name(), || -> anyhow::Result<()> {
            let mut injector = Injector::new("a0", direction, &flows(3), 200)?;
            injector.start_step(step)?;
            injector.inject(90)
        })
        .unwrap();
        let mut buf = [0u8; 2048];
        for i in 0..90u64 {
            let (len, from) = socket.recv_from(&mut buf).unwrap_or_else(|e| {
                panic!("direction {direction}: datagram {i} of 90 not received: {e}")
            });
            assert_eq!(from.port(), 20_000 + (i % 3) as u16);
            let payload = if direction == TO_PEER {
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
                (step, (i % 3) as u32, i / 3)
            );
            let expected = if direction == TO_PEER {
                Direction::ToPeer
            } else {
                Direction::ToClient
            };
            assert_eq!(header.direction, expected);
        }
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
