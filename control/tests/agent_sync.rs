//! The relay-agent API: registration, the Sync stream (snapshot, then changes), status
//! reports, and what operators see of them.

mod common;

use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Streaming};

use common::*;
use proto::control::v1::front_end_client::FrontEndClient;
use proto::control::v1::operator_client::OperatorClient;
use proto::control::v1::relay_agent_client::RelayAgentClient;
use proto::control::v1::{
    AddressRole, AgentAddress, AgentCapacity, AgentHealth, AgentHello, AgentReport, AgentStatus,
    AllocationSummary, ClientTransport, ConferenceCounters, ControlUpdate, HealthState,
    ListAgentsRequest, ListAllocationsRequest, ListConferencesRequest, RegisterAgentRequest,
    RegisterConferenceRequest, RelayCounters, RevokeConferenceRequest, RevokeUserRequest,
    agent_report, control_update, register_conference_request,
};

fn registration(id: &str) -> RegisterAgentRequest {
    RegisterAgentRequest {
        agent_id: id.into(),
        addresses: vec![
            AgentAddress {
                role: AddressRole::Internal as i32,
                ip: "10.0.0.5".into(),
            },
            AgentAddress {
                role: AddressRole::Public as i32,
                ip: "203.0.113.5".into(),
            },
        ],
        capacity: Some(AgentCapacity {
            max_allocations: 1000,
            relay_port_min: 50000,
            relay_port_max: 59999,
        }),
        software_version: "test".into(),
    }
}

fn hello(id: &str) -> AgentReport {
    AgentReport {
        report: Some(agent_report::Report::Hello(AgentHello {
            agent_id: id.into(),
        })),
    }
}

async fn next(updates: &mut Streaming<ControlUpdate>) -> ControlUpdate {
    tokio::time::timeout(STEP, updates.message())
        .await
        .expect("an update arrives in time")
        .unwrap()
        .expect("the stream is open")
}

fn conference(id: &str) -> RegisterConferenceRequest {
    RegisterConferenceRequest {
        conference_id: id.into(),
        session_key: Some(register_conference_request::SessionKey::Key(
            b"key".to_vec(),
        )),
        expires_at_unix: now_unix() + 600,
        anonymous_allowed: true,
        max_participants: 0,
    }
}

#[tokio::test]
async fn an_agent_gets_a_snapshot_then_every_change_and_reports_back() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new("test CA");
    let server = TestServer::start(dir.path(), &pki).await;
    let mut front_end =
        FrontEndClient::new(channel(server.addr, client_config(&pki, &pki.front_end())).await);
    let mut agent =
        RelayAgentClient::new(channel(server.addr, client_config(&pki, &pki.agent())).await);
    let mut operator =
        OperatorClient::new(channel(server.addr, client_config(&pki, &pki.operator())).await);

    front_end
        .register_conference(conference("before"))
        .await
        .unwrap();

    // Sync before registering: refused.
    let (reports, report_stream) = mpsc::channel(8);
    reports.send(hello("edge-1")).await.unwrap();
    let status = agent
        .sync(ReceiverStream::new(report_stream))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status}");

    let registered = agent
        .register_agent(registration("edge-1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        registered.registration.unwrap().certificate_identity,
        format!("dns:{AGENT}")
    );

    let (reports, report_stream) = mpsc::channel(8);
    reports.send(hello("edge-1")).await.unwrap();
    let mut updates = agent
        .sync(ReceiverStream::new(report_stream))
        .await
        .unwrap()
        .into_inner();

    // First the whole state.
    let first = next(&mut updates).await;
    let Some(control_update::Update::Snapshot(snapshot)) = first.update else {
        panic!("the first update is a snapshot: {first:?}");
    };
    assert_eq!(snapshot.conferences.len(), 1);
    assert_eq!(snapshot.conferences[0].conference_id, "before");
    assert!(snapshot.policy.is_some());

    // Then each change, in revision order.
    front_end
        .register_conference(conference("after"))
        .await
        .unwrap();
    let upserted = next(&mut updates).await;
    assert!(upserted.revision > first.revision);
    assert!(matches!(
        &upserted.update,
        Some(control_update::Update::ConferenceUpserted(c)) if c.conference_id == "after"
    ));
    front_end
        .revoke_user(RevokeUserRequest {
            user: "mallory".into(),
        })
        .await
        .unwrap();
    let revoked = next(&mut updates).await;
    assert!(revoked.revision > upserted.revision);
    assert!(matches!(
        &revoked.update,
        Some(control_update::Update::UserRevoked(r)) if r.user == "mallory"
    ));
    front_end
        .revoke_conference(RevokeConferenceRequest {
            conference_id: "before".into(),
        })
        .await
        .unwrap();
    let removed = next(&mut updates).await;
    assert!(matches!(
        &removed.update,
        Some(control_update::Update::ConferenceRemoved(r)) if r.conference_id == "before"
    ));

    // The agent reports; operators see it.
    reports
        .send(AgentReport {
            report: Some(agent_report::Report::Status(AgentStatus {
                applied_revision: removed.revision,
                health: Some(AgentHealth {
                    state: HealthState::Ok as i32,
                    problems: vec![],
                    stale_since_unix: 0,
                }),
                counters: Some(RelayCounters {
                    active_allocations: 1,
                    allocations_total: 3,
                    ..Default::default()
                }),
                allocations: vec![AllocationSummary {
                    username: "1700000000:alice".into(),
                    user: "alice".into(),
                    transport: ClientTransport::Udp as i32,
                    client_address: "198.51.100.7:40000".into(),
                    relayed_address: "203.0.113.5:50001".into(),
                    ..Default::default()
                }],
                conferences: vec![ConferenceCounters {
                    conference_id: "after".into(),
                    active_participants: 2,
                    joins_total: 5,
                    joins_refused: 1,
                }],
                allocations_not_listed: 4,
            })),
        })
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + STEP;
    let agents = loop {
        let agents = operator
            .list_agents(ListAgentsRequest {})
            .await
            .unwrap()
            .into_inner();
        if agents
            .agents
            .first()
            .is_some_and(|a| a.last_report_unix > 0)
        {
            break agents;
        }
        assert!(tokio::time::Instant::now() < deadline, "the status arrives");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let info = &agents.agents[0];
    assert!(info.connected);
    assert_eq!(info.applied_revision, agents.current_revision, "in sync");
    assert_eq!(info.counters.as_ref().unwrap().allocations_total, 3);

    let listed = operator
        .list_allocations(ListAllocationsRequest {
            agent_id: String::new(),
            user: "alice".into(),
        })
        .await
        .unwrap()
        .into_inner();
    // What the agent left out of its report is counted, so a partial list is never taken
    // for the whole.
    assert_eq!(listed.allocations_not_listed, 4);
    let allocations = listed.allocations;
    assert_eq!(allocations.len(), 1);
    assert_eq!(allocations[0].agent_id, "edge-1");
    let none = operator
        .list_allocations(ListAllocationsRequest {
            agent_id: "edge-2".into(),
            user: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .allocations;
    assert!(none.is_empty());

    let conferences = operator
        .list_conferences(ListConferencesRequest {})
        .await
        .unwrap()
        .into_inner()
        .conferences;
    assert_eq!(conferences.len(), 1);
    let counters = conferences[0].counters.as_ref().unwrap();
    assert_eq!((counters.active_participants, counters.joins_total), (2, 5));

    // The agent reconnects: the new stream replaces the old one, which ends.
    let (reports2, report_stream2) = mpsc::channel(8);
    reports2.send(hello("edge-1")).await.unwrap();
    let mut updates2 = agent
        .sync(ReceiverStream::new(report_stream2))
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(
        next(&mut updates2).await.update,
        Some(control_update::Update::Snapshot(_))
    ));
    let ended = tokio::time::timeout(STEP, updates.message())
        .await
        .expect("the old stream ends in time");
    assert!(matches!(ended, Ok(None)), "{ended:?}");

    // A server stopping with a Sync stream open ends it and still stops in time.
    server.stop().await;
    drop(reports);
    drop(reports2);
}

/// An agent id belongs to the certificate that registered it: another agent's certificate
/// can neither open its Sync stream nor take the id over while it is connected; once it is
/// gone, the id may move (a re-homed agent), and the log says so.
#[tokio::test]
async fn an_agent_id_is_bound_to_its_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new("test CA");
    let server = TestServer::start(dir.path(), &pki).await;
    let mut owner =
        RelayAgentClient::new(channel(server.addr, client_config(&pki, &pki.agent())).await);
    let other = pki.client_dns("edge-2.agents.rampart.test", 21);
    let mut intruder =
        RelayAgentClient::new(channel(server.addr, client_config(&pki, &other)).await);

    owner.register_agent(registration("edge-1")).await.unwrap();
    let (reports, report_stream) = mpsc::channel(8);
    reports.send(hello("edge-1")).await.unwrap();
    let mut updates = owner
        .sync(ReceiverStream::new(report_stream))
        .await
        .unwrap()
        .into_inner();
    next(&mut updates).await;

    let (intruder_reports, intruder_stream) = mpsc::channel(8);
    intruder_reports.send(hello("edge-1")).await.unwrap();
    let status = intruder
        .sync(ReceiverStream::new(intruder_stream))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status}");
    let status = intruder
        .register_agent(registration("edge-1"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status}");
    assert!(status.message().contains("connected"), "{status}");

    // The owner goes away: the id may move to the other certificate.
    drop(reports);
    drop(updates);
    let moved = async {
        loop {
            match intruder.register_agent(registration("edge-1")).await {
                Ok(response) => break response.into_inner(),
                Err(status) if status.code() == Code::PermissionDenied => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(status) => panic!("{status}"),
            }
        }
    };
    let moved = tokio::time::timeout(STEP, moved)
        .await
        .expect("the id is free once its agent disconnected");
    assert_eq!(
        moved.registration.unwrap().certificate_identity,
        "dns:edge-2.agents.rampart.test"
    );
    server.stop().await;
}
