//! Internal-party consent on loopback: an external listener (127.0.0.1) and an internal one
//! (127.0.0.4); the internal host is the echo peer's address (127.0.0.2, on the allowed
//! loopback network). With `consent = "party"` (the default) an external user's media to it is
//! held until a client allocates on the internal listener from that address, and then flows
//! with no new request from the external user. With `consent = "authorized"` a front-end must
//! also authorize the pair through the control service, and revoking that ends the flow
//! within a second.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use proto::control::v1::{AuthorizeMediaSessionRequest, RevokeMediaSessionRequest};
use rampart_tests::client::{Received, TurnClient};
use rampart_tests::control::{
    ControlPki, ControlService, issue_credentials, runtime, temp_dir, wait_until,
};
use rampart_tests::coturn::EchoPeer;
use rampart_tests::ports::free_tcp_address;
use rampart_tests::{PASSWORD, PEER_V4, Proto, Rampart, RampartConfig, USER};
use rampart_turn::stun::AddressFamily;

const EXTERNAL: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
const INTERNAL: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 4));
const CHANNEL: u16 = 0x4001;

/// Whether a ChannelData message sent now comes back from the echo peer within `wait`.
fn echoed(client: &mut TurnClient, wait: Duration) -> bool {
    client.send_channel_data(CHANNEL, b"are you there").unwrap();
    let deadline = Instant::now() + wait;
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match client.recv(left).unwrap() {
            Some(Received::Channel { data, .. }) if data == b"are you there" => return true,
            Some(_) => {}
            None => return false,
        }
    }
    false
}

#[test]
fn media_to_an_internal_host_is_held_until_an_internal_party_allocates_there() {
    let mut config = RampartConfig::loopback(&[(Proto::Udp, EXTERNAL), (Proto::Udp, INTERNAL)])
        .with_consent("party")
        .with_stats_interval(1)
        .with_limit("allocations_per_user", "20");
    config.internal_listeners = vec![(Proto::Udp, INTERNAL)];
    let server = Rampart::start(&config).unwrap();
    let peer = EchoPeer::start(IpAddr::V4(PEER_V4));

    let mut external =
        TurnClient::connect_udp(EXTERNAL, server.addr(Proto::Udp, EXTERNAL)).unwrap();
    external
        .allocate(USER, PASSWORD, AddressFamily::V4)
        .unwrap();
    // Accepted, not refused: a browser prunes a pair whose permission fails.
    external.channel_bind(CHANNEL, peer.addr).unwrap();
    assert!(
        !echoed(&mut external, Duration::from_millis(500)),
        "media reached the internal host before any internal party was there"
    );

    // A client on the internal side allocates from the internal host's address.
    let mut party =
        TurnClient::connect_udp(IpAddr::V4(PEER_V4), server.addr(Proto::Udp, INTERNAL)).unwrap();
    party.allocate(USER, PASSWORD, AddressFamily::V4).unwrap();
    assert!(
        echoed(&mut external, Duration::from_secs(2)),
        "media flows once an internal party is there, with no new request"
    );

    let deadline = Instant::now() + Duration::from_secs(5);
    let counted = |c: &serde_json::Value| c["relay"]["consent_granted"].as_u64() == Some(1);
    while !server.counters().last().is_some_and(counted) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    let counters = server.counters().pop().expect("a counters line");
    let relay = &counters["relay"];
    assert_eq!(
        relay["consent_held_permissions"].as_u64(),
        Some(1),
        "{counters}"
    );
    assert_eq!(relay["consent_granted"].as_u64(), Some(1), "{counters}");
    assert!(
        relay["consent_held_dropped"].as_u64() >= Some(1),
        "{counters}"
    );
}

#[test]
fn authorized_mode_follows_the_front_ends_authorization() {
    let rt = runtime();
    let dir = temp_dir().unwrap();
    let pki = ControlPki::create(dir.path()).unwrap();
    let control_address: SocketAddr = free_tcp_address(EXTERNAL).unwrap();
    let control =
        ControlService::start(&pki, &dir.path().join("control"), control_address).unwrap();
    let mut config = RampartConfig::loopback(&[(Proto::Udp, EXTERNAL), (Proto::Udp, INTERNAL)])
        .with_consent("authorized")
        .with_stats_interval(1)
        .with_control(pki.agent_link(control.address));
    config.internal_listeners = vec![(Proto::Udp, INTERNAL)];
    let agent = Rampart::start(&config).unwrap();
    wait_until(
        Duration::from_secs(25),
        "the agent syncs with control",
        || agent.log().contains("control snapshot applied"),
    );
    let peer = EchoPeer::start(IpAddr::V4(PEER_V4));
    let mut front_end = rt.block_on(pki.front_end(control.address)).unwrap();
    let (ext_name, ext_password) =
        issue_credentials(&rt, &mut front_end, "sip:guest@partner.example");
    let (int_name, int_password) = issue_credentials(&rt, &mut front_end, "sip:bob@example.com");

    let mut external = TurnClient::connect_udp(EXTERNAL, agent.addr(Proto::Udp, EXTERNAL)).unwrap();
    external
        .allocate(&ext_name, &ext_password, AddressFamily::V4)
        .unwrap();
    external.channel_bind(CHANNEL, peer.addr).unwrap();
    let mut party =
        TurnClient::connect_udp(IpAddr::V4(PEER_V4), agent.addr(Proto::Udp, INTERNAL)).unwrap();
    party
        .allocate(&int_name, &int_password, AddressFamily::V4)
        .unwrap();
    assert!(
        !echoed(&mut external, Duration::from_millis(500)),
        "an internal party alone is not enough in authorized mode"
    );

    rt.block_on(
        front_end.authorize_media_session(AuthorizeMediaSessionRequest {
            external_user: "sip:guest@partner.example".into(),
            internal_user: "sip:bob@example.com".into(),
            lifetime_seconds: 300,
        }),
    )
    .unwrap();
    wait_until(
        Duration::from_secs(2),
        "media flows once authorized",
        || echoed(&mut external, Duration::from_millis(100)),
    );

    let revoked = rt
        .block_on(front_end.revoke_media_session(RevokeMediaSessionRequest {
            external_user: "sip:guest@partner.example".into(),
            internal_user: "sip:bob@example.com".into(),
        }))
        .unwrap()
        .into_inner();
    assert!(revoked.revoked);
    // The flow ends within a second of the revocation: the last echo comes back before then.
    let took = wait_until(
        Duration::from_secs(1),
        "the revocation ends the flow",
        || !echoed(&mut external, Duration::from_millis(100)),
    );
    eprintln!("flow ended {took:?} after RevokeMediaSession returned");
    assert!(
        !echoed(&mut external, Duration::from_millis(500)),
        "media stays held after the revocation"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    let counted = |c: &serde_json::Value| c["relay"]["consent_withdrawn"].as_u64() == Some(1);
    while !agent.counters().last().is_some_and(counted) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    let counters = agent.counters().pop().expect("a counters line");
    assert_eq!(
        counters["relay"]["consent_withdrawn"].as_u64(),
        Some(1),
        "{counters}"
    );
}
