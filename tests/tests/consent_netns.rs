//! Internal-party consent on a two-armed edge with the XDP fast path (`rampart_tests::topology`:
//! an external client host, the edge in its own namespace, an internal host), in `authorized`
//! mode with the control service beside the agent:
//!
//! - the external user's channel to the internal host is accepted but held: nothing reaches
//!   the host, nothing is installed in the kernel;
//! - an internal party allocates on the edge's internal listener from that host, and a
//!   front-end authorizes the pair: media flows both ways, in the kernel, with no new request
//!   from the external client;
//! - the front-end revokes the authorization: the flow stops within a second, kernel included.
//!
//! In `party` mode (no control service) the party's allocation alone releases the channel, into
//! the kernel, or, with the fast path off, into the userspace relay.
//!
//! Needs root (namespaces, XDP); skipped with a message without it, except under CI.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use proto::control::v1::{AuthorizeMediaSessionRequest, RevokeMediaSessionRequest};
use rampart_tests::control::{
    ControlPki, ControlService, issue_credentials, runtime, temp_dir, wait_until,
};
use rampart_tests::media::{
    Channel, client_to_peer, kernel_flow, messages, next_counters, number, peer_to_client,
    userspace_delta, xdp_delta,
};
use rampart_tests::netns::run_in;
use rampart_tests::ports::free_tcp_address;
use rampart_tests::topology::{EdgeTopology, SenderChecksums};
use rampart_tests::{PASSWORD, Proto, Rampart, RampartConfig, TurnClient, USER};
use rampart_turn::stun::AddressFamily;

const CHANNEL: u16 = 0x4000;
const EXTERNAL_USER: &str = "sip:guest@partner.example";
const INTERNAL_USER: &str = "sip:bob@example.com";

/// Whether a ChannelData message sent now reaches the peer within `wait`.
fn reaches_peer(client: &mut TurnClient, channel: &Channel, wait: Duration) -> bool {
    client
        .send_channel_data(CHANNEL, b"knock knock")
        .expect("send ChannelData");
    let _ = channel
        .peer
        .set_read_timeout(Some(Duration::from_millis(10)));
    let deadline = Instant::now() + wait;
    let mut buf = [0u8; 64];
    while Instant::now() < deadline {
        if let Ok((n, _)) = channel.peer.recv_from(&mut buf)
            && &buf[..n] == b"knock knock"
        {
            return true;
        }
    }
    false
}

/// The edge with an internal UDP listener on its internal address, started with `config`'s
/// consent (and control link, if any), and an external client whose channel to the internal
/// host is bound and held: nothing in the kernel, nothing reaches the host.
struct Held {
    server: Rampart,
    client: TurnClient,
    channel: Channel,
    internal_listener: SocketAddr,
}

fn held_channel(
    topology: &EdgeTopology,
    mut config: RampartConfig,
    before_clients: impl FnOnce(&Rampart) -> (String, String),
) -> Held {
    let internal_ip = topology.edge_internal_ip(false);
    config.listeners.push((Proto::Udp, internal_ip));
    config.internal_listeners = vec![(Proto::Udp, internal_ip)];
    let server = Rampart::start(&config).expect("start rampart in the edge namespace");
    let (username, password) = before_clients(&server);
    let listener = server.addr(Proto::Udp, topology.edge_external_ip(false));
    let client_ip = topology.client_ip(false);
    let mut client = run_in(topology.client.name(), || {
        TurnClient::connect_udp(client_ip, listener)
    })
    .unwrap();
    let allocated = client
        .allocate(&username, &password, AddressFamily::V4)
        .unwrap();
    let host = topology.peer_ip(false);
    let channel = Channel {
        number: CHANNEL,
        peer: run_in(topology.peer.name(), || UdpSocket::bind((host, 0))).unwrap(),
        relayed: allocated.relayed(),
    };
    let peer_addr: SocketAddr = channel.peer.local_addr().unwrap();
    client.channel_bind(CHANNEL, peer_addr).unwrap();
    let counters = next_counters(&server).unwrap();
    assert!(
        counters["fast_path"].is_null()
            || number(&counters, &["fast_path", "channels_installed"]) == 0,
        "a held channel is not put into the kernel: {}",
        counters["fast_path"]
    );
    assert!(
        !reaches_peer(&mut client, &channel, Duration::from_millis(300)),
        "media reached the internal host without consent"
    );
    let internal_listener = server.addr(Proto::Udp, internal_ip);
    Held {
        server,
        client,
        channel,
        internal_listener,
    }
}

/// An internal party allocates on the internal listener from the internal host.
fn party_allocates(
    topology: &EdgeTopology,
    held: &Held,
    username: &str,
    password: &str,
) -> TurnClient {
    let host = topology.peer_ip(false);
    let internal = held.internal_listener;
    let mut party = run_in(topology.peer.name(), || {
        TurnClient::connect_udp(host, internal)
    })
    .unwrap();
    party
        .allocate(username, password, AddressFamily::V4)
        .unwrap();
    party
}

/// Which of the agent's paths the released media must take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Path {
    Kernel,
    Userspace,
}

/// Waits (2 s at most) for media to reach the host, then checks that 50 messages each way
/// pass, through the kernel or through the userspace relay.
fn media_flows(held: &mut Held, path: Path) {
    let deadline = Instant::now() + Duration::from_secs(2);
    while !reaches_peer(&mut held.client, &held.channel, Duration::from_millis(100)) {
        assert!(
            Instant::now() < deadline,
            "media does not flow after consent"
        );
    }
    let before = next_counters(&held.server).unwrap();
    client_to_peer(&mut held.client, &held.channel, &messages(1, 50)).unwrap();
    peer_to_client(&mut held.client, &held.channel, &messages(2, 50)).unwrap();
    let after = next_counters(&held.server).unwrap();
    let flow = match path {
        Path::Kernel => kernel_flow(&xdp_delta(&before, &after)),
        Path::Userspace => userspace_delta(&before, &after),
    };
    assert!(
        flow.to_peer.packets >= 45 && flow.to_client.packets >= 45,
        "the media did not go through the {path:?} path: {flow}"
    );
}

#[test]
fn in_party_mode_media_flows_through_the_kernel_once_an_internal_party_allocates() {
    let Some(topology) = EdgeTopology::create("consent_netns (party)", SenderChecksums::Complete)
        .expect("build the topology")
    else {
        return;
    };
    let config = topology.agent_config("native").with_consent("party");
    let mut held = held_channel(&topology, config, |_| (USER.into(), PASSWORD.into()));
    let _party = party_allocates(&topology, &held, USER, PASSWORD);
    media_flows(&mut held, Path::Kernel);
}

#[test]
fn in_party_mode_media_flows_through_userspace_once_an_internal_party_allocates() {
    let Some(topology) = EdgeTopology::create(
        "consent_netns (party, userspace)",
        SenderChecksums::Complete,
    )
    .expect("build the topology") else {
        return;
    };
    let config = topology.agent_config("off").with_consent("party");
    let mut held = held_channel(&topology, config, |_| (USER.into(), PASSWORD.into()));
    let _party = party_allocates(&topology, &held, USER, PASSWORD);
    media_flows(&mut held, Path::Userspace);
}

#[test]
fn an_external_users_media_reaches_inside_only_while_a_front_end_authorizes_it() {
    let Some(topology) = EdgeTopology::create("consent_netns", SenderChecksums::Complete)
        .expect("build the topology")
    else {
        return;
    };
    let dir = temp_dir().unwrap();
    let pki = ControlPki::create(dir.path()).unwrap();
    let control_address = free_tcp_address(IpAddr::V4(Ipv4Addr::LOCALHOST)).unwrap();
    let control = ControlService::start_in(
        &pki,
        &dir.path().join("control"),
        control_address,
        Some(topology.edge.name()),
    )
    .unwrap();
    let config = topology
        .agent_config("native")
        .with_consent("authorized")
        .with_control(pki.agent_link(control.address));
    // The front-end reaches control inside the edge's namespace: its connection is made there.
    let rt = runtime();
    let mut front_end = run_in(topology.edge.name(), || {
        rt.block_on(pki.front_end(control.address))
    })
    .unwrap();
    let mut internal_credentials = None;
    let mut held = held_channel(&topology, config, |server| {
        wait_until(
            Duration::from_secs(25),
            "the agent syncs with control",
            || server.log().contains("control snapshot applied"),
        );
        internal_credentials = Some(issue_credentials(&rt, &mut front_end, INTERNAL_USER));
        issue_credentials(&rt, &mut front_end, EXTERNAL_USER)
    });
    let (internal_name, internal_password) = internal_credentials.expect("issued");

    // An internal party allocates from the host: not enough in authorized mode.
    let _party = party_allocates(&topology, &held, &internal_name, &internal_password);
    assert!(
        !reaches_peer(&mut held.client, &held.channel, Duration::from_millis(300)),
        "a party alone is not enough in authorized mode"
    );
    // A front-end authorizes the pair: media flows, with no new request from the client.
    rt.block_on(
        front_end.authorize_media_session(AuthorizeMediaSessionRequest {
            external_user: EXTERNAL_USER.into(),
            internal_user: INTERNAL_USER.into(),
            lifetime_seconds: 300,
        }),
    )
    .unwrap();
    media_flows(&mut held, Path::Kernel);

    // Revoked: the flow stops within a second, the kernel's channel with it.
    rt.block_on(front_end.revoke_media_session(RevokeMediaSessionRequest {
        external_user: EXTERNAL_USER.into(),
        internal_user: INTERNAL_USER.into(),
    }))
    .unwrap();
    let revoked = Instant::now();
    while reaches_peer(&mut held.client, &held.channel, Duration::from_millis(20)) {
        assert!(
            revoked.elapsed() < Duration::from_secs(1),
            "media still flows a second after the revocation"
        );
    }
    let took = revoked.elapsed();
    assert!(
        !reaches_peer(&mut held.client, &held.channel, Duration::from_millis(500)),
        "media flows again after the revocation"
    );
    let withdrawn = next_counters(&held.server).unwrap();
    assert_eq!(
        number(&withdrawn, &["relay", "consent_withdrawn"]),
        1,
        "{withdrawn}"
    );
    eprintln!("consent_netns: the flow stopped {took:?} after RevokeMediaSession returned");
}
