//! coturn's test tools as independent peers: `turnutils_peer` as an echo peer,
//! `turnutils_uclient` as a TURN client whose closing totals the tests read.
//!
//! A missing tool fails the test with the command that installs it.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::client::loopback;
use crate::tools::{self, Background, Finished};
use crate::{Proto, Rampart, ports};

pub const INSTALL_HINT: &str = "coturn (turnutils_uclient, turnutils_peer, turnutils_stunclient)";
/// A uclient run sends `-n` messages 20 ms apart per client; this bounds a hung one.
pub const UCLIENT_LIMIT: Duration = Duration::from_secs(60);
/// Messages per uclient client (`-n`).
pub const MESSAGES: u64 = 20;

pub struct EchoPeer {
    pub addr: SocketAddr,
    _process: Background,
}

impl EchoPeer {
    pub fn start(ip: IpAddr) -> EchoPeer {
        let binary = tools::require("turnutils_peer", INSTALL_HINT);
        let port = ports::free_port(Proto::Udp, ip).expect("a free port for the peer");
        let mut process = Background::spawn(Command::new(binary).args([
            "-L",
            &ip.to_string(),
            "-p",
            &port.to_string(),
        ]))
        .expect("start turnutils_peer");
        let addr = SocketAddr::new(ip, port);
        wait_for_echo(addr, &mut process).expect("turnutils_peer answers");
        EchoPeer {
            addr,
            _process: process,
        }
    }
}

/// The peer is up once it echoes a datagram (bounded: 5 s).
fn wait_for_echo(peer: SocketAddr, process: &mut Background) -> anyhow::Result<()> {
    let socket = UdpSocket::bind(SocketAddr::new(loopback(peer.is_ipv6()), 0))?;
    socket.set_read_timeout(Some(Duration::from_millis(100)))?;
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut buf = [0u8; 64];
    while Instant::now() < deadline {
        process.ensure_running()?;
        socket.send_to(b"ping", peer)?;
        if let Ok((n, from)) = socket.recv_from(&mut buf)
            && from == peer
            && &buf[..n] == b"ping"
        {
            return Ok(());
        }
    }
    bail!("turnutils_peer at {peer} did not echo within 5 s")
}

/// uclient against `server`'s `proto` listener, relaying to `peer`; `-n`, `-c`, `-e`, `-r`,
/// `-p` and the server address are added here.
pub fn uclient(server: &Rampart, proto: Proto, peer: &EchoPeer, args: &[&str]) -> Finished {
    let v6 = peer.addr.is_ipv6();
    let addr = server.loopback_addr(proto, v6);
    let port = addr.port().to_string();
    let host = addr.ip().to_string();
    let peer_ip = peer.addr.ip().to_string();
    let peer_port = peer.addr.port().to_string();
    let n = MESSAGES.to_string();
    let mut all: Vec<&str> = args.to_vec();
    all.extend_from_slice(&[
        "-c", "-n", &n, "-e", &peer_ip, "-r", &peer_port, "-p", &port, &host,
    ]);
    run_uclient(&all)
}

pub fn run_uclient(args: &[&str]) -> Finished {
    let binary = tools::require("turnutils_uclient", INSTALL_HINT);
    tools::run_bounded(Command::new(binary).args(args), UCLIENT_LIMIT)
        .unwrap_or_else(|e| panic!("turnutils_uclient {}: {e:#}", args.join(" ")))
}

/// uclient's closing totals.
#[derive(Debug, PartialEq, Eq)]
pub struct Totals {
    pub sent: u64,
    pub received: u64,
    pub lost: u64,
    pub send_dropped: u64,
}

pub fn totals(output: &str) -> anyhow::Result<Totals> {
    let number_after = |line: &str, key: &str| -> anyhow::Result<u64> {
        let rest = line
            .split(key)
            .nth(1)
            .with_context(|| format!("`{key}` missing in {line:?}"))?;
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        digits
            .parse()
            .with_context(|| format!("no number after `{key}` in {line:?}"))
    };
    // The running progress lines carry `msz=`; the final one does not.
    let messages = output
        .lines()
        .rfind(|l| l.contains("tot_send_msgs=") && !l.contains("msz="))
        .context("no final `tot_send_msgs=` line")?;
    let lost = output
        .lines()
        .rfind(|l| l.contains("Total lost packets"))
        .context("no `Total lost packets` line")?;
    Ok(Totals {
        sent: number_after(messages, "tot_send_msgs=")?,
        received: number_after(messages, "tot_recv_msgs=")?,
        lost: number_after(lost, "Total lost packets ")?,
        send_dropped: number_after(lost, "total send dropped ")?,
    })
}

pub fn assert_all_echoed(run: &Finished, expected: u64) {
    assert!(
        run.status.success(),
        "turnutils_uclient failed\n{}",
        run.output()
    );
    let totals = totals(&run.stdout)
        .or_else(|_| totals(&run.stderr))
        .unwrap_or_else(|e| panic!("{e:#}\n{}", run.output()));
    assert_eq!(
        totals,
        Totals {
            sent: expected,
            received: expected,
            lost: 0,
            send_dropped: 0
        },
        "every message must come back through the relay\n{}",
        run.output()
    );
}
