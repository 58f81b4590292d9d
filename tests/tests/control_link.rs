//! The agent's link to the control service, end to end: `rampart-control` and `rampart` as
//! processes talking mutual TLS. A front-end gets media credentials from control, a TURN
//! client allocates with them on the agent, and revoking the user through control ends the
//! allocation on the agent within a second. An agent started before control converges once
//! control comes up, and again after control restarts.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::time::Duration;

use proto::control::v1::{
    AccessPolicy, HealthState, IssueMediaCredentialsRequest, ListAgentsRequest, RevokeUserRequest,
    SetAccessPolicyRequest,
};
use rampart_tests::control::{AGENT_ID, ControlPki, ControlService, runtime, temp_dir, wait_until};
use rampart_tests::coturn::{EchoPeer, MESSAGES, assert_all_echoed, uclient};
use rampart_tests::ports::free_tcp_address;
use rampart_tests::{PASSWORD, PEER_V4, Proto, Rampart, RampartConfig, USER};
use rampart_turn::stun::AddressFamily;

/// How long an agent may take to (re)connect to control: its reconnection backoff is capped
/// at 15 s.
const CONVERGE: Duration = Duration::from_secs(25);

fn control_address() -> SocketAddr {
    free_tcp_address(IpAddr::V4(Ipv4Addr::LOCALHOST)).unwrap()
}

fn snapshots_applied(agent: &Rampart) -> usize {
    agent.log().matches("control snapshot applied").count()
}

#[test]
fn revoking_a_user_through_control_ends_their_allocation_on_the_agent() {
    let rt = runtime();
    let dir = temp_dir().unwrap();
    let pki = ControlPki::create(dir.path()).unwrap();
    let control =
        ControlService::start(&pki, &dir.path().join("control"), control_address()).unwrap();
    let agent = Rampart::start(
        &RampartConfig::single(Proto::Udp, false)
            .with_stats_interval(1)
            .with_control(pki.agent_link(control.address)),
    )
    .unwrap();
    wait_until(CONVERGE, "the agent syncs with control", || {
        snapshots_applied(&agent) >= 1
    });

    let mut front_end = rt.block_on(pki.front_end(control.address)).unwrap();
    let credentials = rt
        .block_on(
            front_end.issue_media_credentials(IssueMediaCredentialsRequest {
                user: "bob".into(),
                lifetime_seconds: None,
            }),
        )
        .unwrap()
        .into_inner();
    assert!(credentials.username.ends_with(":bob"), "{credentials:?}");

    // An independent session of another user, which the revocation must leave alone.
    let mut alice = agent.client(Proto::Udp, false).unwrap();
    alice.allocate(USER, PASSWORD, AddressFamily::V4).unwrap();
    let mut bob = agent.client(Proto::Udp, false).unwrap();
    let relayed = bob
        .allocate(
            &credentials.username,
            &credentials.password,
            AddressFamily::V4,
        )
        .unwrap()
        .relayed[0];
    // The agent holds the relayed port while the allocation lives.
    assert!(UdpSocket::bind(relayed).is_err(), "{relayed} is not held");

    rt.block_on(front_end.revoke_user(RevokeUserRequest { user: "bob".into() }))
        .unwrap();
    let took = wait_until(
        Duration::from_secs(1),
        "the revoked user's relayed port is released",
        || UdpSocket::bind(relayed).is_ok(),
    );
    eprintln!("allocation ended {took:?} after RevokeUser returned");

    // The counters agree: one allocation (alice's) left, bob's deleted.
    wait_until(
        Duration::from_secs(5),
        "a counters line shows the revocation",
        || {
            agent.counters().last().is_some_and(|c| {
                c["allocations"] == 1 && c["relay"]["allocations_deleted"].as_u64() >= Some(1)
            })
        },
    );
    // The old credentials are refused from now on; alice's allocation still works.
    let mut again = agent.client(Proto::Udp, false).unwrap();
    let refused = again
        .try_allocate(&credentials.username, &credentials.password, &[])
        .unwrap();
    assert_eq!(refused.error_code(), Some(401), "{}", refused.describe());
    assert!(alice.refresh(600).unwrap() > 0);

    // Control sees the agent caught up, healthy, with its counters.
    let mut operator = rt.block_on(pki.operator(control.address)).unwrap();
    let mut last = None;
    let reported = (0..100).any(|_| {
        let agents = rt
            .block_on(operator.list_agents(ListAgentsRequest::default()))
            .unwrap()
            .into_inner();
        let ok = agents.agents.iter().any(|agent| {
            let counters = agent.counters.unwrap_or_default();
            agent.registration.as_ref().map(|r| r.agent_id.as_str()) == Some(AGENT_ID)
                && agent.connected
                && agent.applied_revision == agents.current_revision
                && agent.health.as_ref().map(|h| (h.state, h.stale_since_unix))
                    == Some((HealthState::Ok as i32, 0))
                && counters.active_allocations == 1
                && counters.allocations_total == 2
        });
        last = Some(agents);
        if !ok {
            std::thread::sleep(Duration::from_millis(50));
        }
        ok
    });
    assert!(reported, "the agent's report at control: {last:?}");
    drop(control);
}

#[test]
fn an_agent_started_before_control_converges_and_again_after_a_control_restart() {
    let rt = runtime();
    let dir = temp_dir().unwrap();
    let pki = ControlPki::create(dir.path()).unwrap();
    let address = control_address();
    // No allowed networks in the agent's own configuration: loopback peers are refused until
    // control's policy allows them.
    let agent = Rampart::start(
        &RampartConfig::single(Proto::Udp, false)
            .with_default_peer_policy()
            .with_control(pki.agent_link(address)),
    )
    .unwrap();
    let mut client = agent.client(Proto::Udp, false).unwrap();
    // Serving without control: static credentials work, the peer is refused by policy.
    client.allocate(USER, PASSWORD, AddressFamily::V4).unwrap();
    let peer = |last: u8| SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, last)), 40000);
    let refused = client.try_create_permission(&[peer(2)]).unwrap();
    assert_eq!(refused.error_code(), Some(403), "{}", refused.describe());
    // Let a few connection attempts fail.
    std::thread::sleep(Duration::from_secs(2));

    let state = dir.path().join("control");
    let control = ControlService::start(&pki, &state, address).unwrap();
    let mut front_end = rt.block_on(pki.front_end(address)).unwrap();
    rt.block_on(front_end.set_access_policy(SetAccessPolicyRequest {
        policy: Some(AccessPolicy {
            internal_peer_networks: vec!["127.0.0.0/8".into()],
            ..Default::default()
        }),
    }))
    .unwrap();
    wait_until(CONVERGE, "the policy reaches the agent", || {
        client
            .try_create_permission(&[peer(2)])
            .unwrap()
            .is_success()
    });
    let log = agent.log();
    assert_eq!(
        log.matches("control service unreachable").count(),
        1,
        "an outage is logged once:\n{log}"
    );

    // Control goes away; the agent keeps serving with the last state.
    control.kill();
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        client
            .try_create_permission(&[peer(3)])
            .unwrap()
            .is_success(),
        "the last policy stays in force while control is down"
    );
    // Control comes back (same state) and the policy changes: the agent converges.
    let synced = snapshots_applied(&agent);
    let _control = ControlService::start(&pki, &state, address).unwrap();
    let mut front_end = rt.block_on(pki.front_end(address)).unwrap();
    rt.block_on(front_end.set_access_policy(SetAccessPolicyRequest {
        policy: Some(AccessPolicy::default()),
    }))
    .unwrap();
    wait_until(CONVERGE, "the new policy reaches the agent", || {
        client
            .try_create_permission(&[peer(4)])
            .unwrap()
            .error_code()
            == Some(403)
    });
    assert!(
        snapshots_applied(&agent) > synced,
        "the agent resynchronised"
    );
    assert_eq!(
        agent.log().matches("control service unreachable").count(),
        2,
        "one log line per outage"
    );
}

/// Credentials a front-end obtained from control, used by a TURN client we did not write
/// (coturn's `turnutils_uclient`): it allocates on the agent, binds a channel and gets every
/// message back from an echo peer.
#[test]
fn credentials_issued_by_control_work_for_an_independent_turn_client() {
    let rt = runtime();
    let dir = temp_dir().unwrap();
    let pki = ControlPki::create(dir.path()).unwrap();
    let control =
        ControlService::start(&pki, &dir.path().join("control"), control_address()).unwrap();
    let agent = Rampart::start(
        &RampartConfig::single(Proto::Udp, false).with_control(pki.agent_link(control.address)),
    )
    .unwrap();
    let mut front_end = rt.block_on(pki.front_end(control.address)).unwrap();
    let credentials = rt
        .block_on(
            front_end.issue_media_credentials(IssueMediaCredentialsRequest {
                user: "carol".into(),
                lifetime_seconds: Some(600),
            }),
        )
        .unwrap()
        .into_inner();
    let peer = EchoPeer::start(IpAddr::V4(PEER_V4));
    let run = uclient(
        &agent,
        Proto::Udp,
        &peer,
        &[
            "-u",
            &credentials.username,
            "-w",
            &credentials.password,
            "-m",
            "1",
        ],
    );
    assert_all_echoed(&run, MESSAGES);
}
