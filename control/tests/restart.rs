//! State survives a control restart: the same database file, a new process-equivalent
//! server (new listener, new state), and nothing lost.

mod common;

use common::*;
use proto::control::v1::front_end_client::FrontEndClient;
use proto::control::v1::operator_client::OperatorClient;
use proto::control::v1::relay_agent_client::RelayAgentClient;
use proto::control::v1::{
    AccessPolicy, AddressRole, AgentAddress, GetAccessPolicyRequest, ListAgentsRequest,
    ListConferencesRequest, RegisterAgentRequest, RegisterConferenceRequest,
    SetAccessPolicyRequest, register_conference_request,
};
use tonic::Code;

#[tokio::test]
async fn a_conference_registered_before_a_restart_is_still_there_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new("test CA");
    let expiry = now_unix() + 3600;

    let server = TestServer::start(dir.path(), &pki).await;
    let front_end_tls = client_config(&pki, &pki.front_end());
    let mut front_end = FrontEndClient::new(channel(server.addr, front_end_tls.clone()).await);
    front_end
        .register_conference(RegisterConferenceRequest {
            conference_id: "board-meeting".into(),
            session_key: Some(register_conference_request::SessionKey::Key(
                b"s3cret".to_vec(),
            )),
            expires_at_unix: expiry,
            anonymous_allowed: false,
            max_participants: 12,
        })
        .await
        .unwrap();
    let policy = front_end
        .set_access_policy(SetAccessPolicyRequest {
            policy: Some(AccessPolicy {
                remote_users_enabled: true,
                internal_peer_networks: vec!["10.0.0.0/8".into()],
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner();
    RelayAgentClient::new(channel(server.addr, client_config(&pki, &pki.agent())).await)
        .register_agent(RegisterAgentRequest {
            agent_id: "edge-1".into(),
            addresses: vec![AgentAddress {
                role: AddressRole::External as i32,
                ip: "192.0.2.10".into(),
            }],
            capacity: None,
            software_version: "test".into(),
        })
        .await
        .unwrap();
    drop(front_end);
    server.stop().await;

    // Same directory, same database file, new server.
    let server = TestServer::start_with(dir.path(), &config_text(""), |_| {}).await;
    let operator_tls = client_config(&pki, &pki.operator());
    let mut operator = OperatorClient::new(channel(server.addr, operator_tls).await);
    let conferences = operator
        .list_conferences(ListConferencesRequest {})
        .await
        .unwrap()
        .into_inner()
        .conferences;
    assert_eq!(conferences.len(), 1);
    let conference = &conferences[0];
    assert_eq!(conference.conference_id, "board-meeting");
    assert_eq!(conference.expires_at_unix, expiry);
    assert_eq!(conference.max_participants, 12);
    assert!(!conference.anonymous_allowed);

    let agents = operator
        .list_agents(ListAgentsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(agents.agents.len(), 1);
    assert_eq!(
        agents.agents[0].registration.as_ref().unwrap().agent_id,
        "edge-1"
    );
    assert!(!agents.agents[0].connected);
    assert_eq!(agents.current_revision, policy.revision);

    let mut front_end = FrontEndClient::new(channel(server.addr, front_end_tls).await);
    let stored = front_end
        .get_access_policy(GetAccessPolicyRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stored.policy, policy.policy);
    // The id is still taken.
    let duplicate = front_end
        .register_conference(RegisterConferenceRequest {
            conference_id: "board-meeting".into(),
            session_key: Some(register_conference_request::SessionKey::Key(b"x".to_vec())),
            expires_at_unix: expiry,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(duplicate.code(), Code::AlreadyExists);
    server.stop().await;
}
