//! The Web Conferencing Edge never connects towards the internal network: the internal
//! conferencing server lives on a host of its own whose firewall drops every inbound TCP
//! connection attempt (nftables, counting them), and conferences still work, because that
//! server dials the edge. The drop counter shows the edge never even tried.
//!
//! ```text
//!  edge ns: control, rampart, participants (loopback)      internal ns: reference server
//!  i0 10.202.2.1  (internal port 10.202.2.1:8057)  <-- veth -->  p0 10.202.2.2
//! ```

use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use proto::control::v1::{RegisterConferenceRequest, register_conference_request};
use rampart_psom::reference::ConferenceServer;
use rampart_tests::conferencing::{self, Joined, request};
use rampart_tests::control::{ControlPki, ControlService, temp_dir};
use rampart_tests::netns::{self, Netns};
use rampart_tests::ports::free_port;
use rampart_tests::tools;
use rampart_tests::{Proto, Rampart, RampartConfig};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio_util::sync::CancellationToken;

const EDGE_IP: Ipv4Addr = Ipv4Addr::new(10, 202, 2, 1);
const INTERNAL_IP: Ipv4Addr = Ipv4Addr::new(10, 202, 2, 2);
const KEY: &[u8] = b"internal-dial-out";

/// Drop (and count) every TCP segment that opens a connection to the internal host.
const FIREWALL: &str = "table inet rampart_test {
  chain input {
    type filter hook input priority 0; policy accept;
    tcp flags & (syn | ack) == syn counter drop
  }
}
";

fn nft(ns: &Netns, args: &[&str], stdin: Option<&str>) -> String {
    let nft = tools::require("nft", "nftables");
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns.name()])
        .arg(nft)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run nft");
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
    }
    drop(child.stdin.take());
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "nft {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Connection attempts the internal host's firewall dropped so far.
fn dropped(ns: &Netns) -> u64 {
    let ruleset = nft(ns, &["list", "ruleset"], None);
    ruleset
        .split("counter packets ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no counter in {ruleset}"))
}

#[test]
fn the_edge_opens_no_connection_towards_the_internal_network() {
    if !netns::can_create("the_edge_opens_no_connection_towards_the_internal_network") {
        return;
    }
    let edge = Netns::create().unwrap();
    let internal = Netns::create().unwrap();
    edge.ip(&[
        "link",
        "add",
        "i0",
        "type",
        "veth",
        "peer",
        "name",
        "p0",
        "netns",
        internal.name(),
    ])
    .unwrap();
    edge.ip(&["addr", "add", "10.202.2.1/24", "dev", "i0"])
        .unwrap();
    internal
        .ip(&["addr", "add", "10.202.2.2/24", "dev", "p0"])
        .unwrap();
    edge.ip(&["link", "set", "dev", "i0", "up"]).unwrap();
    internal.ip(&["link", "set", "dev", "p0", "up"]).unwrap();
    nft(&internal, &["-f", "-"], Some(FIREWALL));

    // The firewall works: a connection from the edge to the internal host goes nowhere.
    let probe = SocketAddr::new(IpAddr::V4(INTERNAL_IP), 9);
    let refused = edge.run(move || TcpStream::connect_timeout(&probe, Duration::from_millis(700)));
    assert!(refused.is_err(), "the internal host accepted a connection");
    let before = dropped(&internal);
    assert!(before >= 1, "the probe was not dropped by the firewall");

    let dir = temp_dir().unwrap();
    let pki = Arc::new(ControlPki::create(dir.path()).unwrap());
    let loopback = |ns: &Netns| {
        let ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
        ns.run(move || SocketAddr::new(ip, free_port(Proto::Tcp, ip).unwrap()))
    };
    let control_address = loopback(&edge);
    let external = loopback(&edge);
    let internal_port = SocketAddr::new(IpAddr::V4(EDGE_IP), 8057);
    let control = ControlService::start_in(
        &pki,
        &dir.path().join("control"),
        control_address,
        Some(edge.name()),
    )
    .unwrap();
    let agent = Rampart::start(
        &RampartConfig::single(Proto::Udp, false)
            .with_control(pki.agent_link(control.address))
            .with_conferencing(conferencing::config(&pki, external, internal_port))
            .in_netns(edge.name()),
    )
    .unwrap();

    // The reference server on the internal host, dialling out to the edge.
    let server = ConferenceServer::new();
    let shutdown = CancellationToken::new();
    let internal_host = {
        let (name, pki, server, shutdown) = (
            internal.name().to_owned(),
            pki.clone(),
            server.clone(),
            shutdown.clone(),
        );
        std::thread::spawn(move || {
            netns::run_in(&name, || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async {
                    let link = conferencing::edge_link(&pki, internal_port).unwrap();
                    tokio::spawn(rampart_psom::internal::run(
                        link,
                        2,
                        move |assign, session| server.clone().serve(assign, session),
                        shutdown.clone(),
                    ));
                    shutdown.cancelled().await;
                });
            });
        })
    };

    // A front-end registers a conference; two participants join from outside and share.
    let exchanged = {
        let pki = pki.clone();
        let control_address = control.address;
        edge.run(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let mut front_end = pki.front_end(control_address).await.unwrap();
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_secs();
                front_end
                    .register_conference(RegisterConferenceRequest {
                        conference_id: "dmz".into(),
                        session_key: Some(register_conference_request::SessionKey::Key(
                            KEY.to_vec(),
                        )),
                        expires_at_unix: now + 600,
                        anonymous_allowed: true,
                        max_participants: 0,
                    })
                    .await
                    .unwrap();
                let started = Instant::now();
                let join = || async {
                    loop {
                        match conferencing::join(&pki, external, request("dmz", KEY, true))
                            .await
                            .unwrap()
                        {
                            Joined::Accepted(stream) => return stream,
                            Joined::Refused(frame) => {
                                assert!(
                                    started.elapsed() < Duration::from_secs(15),
                                    "never admitted: {frame:?}"
                                );
                                tokio::time::sleep(Duration::from_millis(100)).await;
                            }
                        }
                    }
                };
                let mut first = join().await;
                first.write_all(b"whiteboard").await.unwrap();
                let mut second = join().await;
                let mut got = [0u8; 10];
                tokio::time::timeout(Duration::from_secs(5), second.read_exact(&mut got))
                    .await
                    .expect("the shared state arrives")
                    .unwrap();
                got.to_vec()
            })
        })
    };
    assert_eq!(exchanged, b"whiteboard");
    assert_eq!(server.stats().sessions, 2, "{}", agent.log());
    assert_eq!(
        dropped(&internal),
        before,
        "the edge tried to open a connection towards the internal host"
    );
    shutdown.cancel();
    internal_host.join().unwrap();
}
