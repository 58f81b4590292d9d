//! Internal-party consent (`[relay] consent = "party"`, the default) on loopback: an external
//! listener (127.0.0.1) and an internal one (127.0.0.4); the internal host is the echo peer's
//! address (127.0.0.2, on the allowed loopback network). An external user's media to it is
//! held until a client allocates on the internal listener from that address, and then flows
//! with no new request from the external user.

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use rampart_tests::client::{Received, TurnClient};
use rampart_tests::coturn::EchoPeer;
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
