//! Mutual TLS at the door: who gets a connection, and which RPCs each role may call.

mod common;

use std::sync::Arc;

use common::*;
use proto::control::v1::front_end_client::FrontEndClient;
use proto::control::v1::operator_client::OperatorClient;
use proto::control::v1::relay_agent_client::RelayAgentClient;
use proto::control::v1::{
    IssueMediaCredentialsRequest, ListAgentsRequest, RegisterConferenceRequest,
    SetAccessPolicyRequest,
};
use tonic::Code;

#[tokio::test]
async fn handshake_refused_without_a_client_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new("test CA");
    let server = TestServer::start(dir.path(), &pki).await;

    let anonymous = rustls::ClientConfig::builder_with_provider(control::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(pki.roots())
        .with_no_client_auth();
    let error = probe(server.addr, Arc::new(anonymous)).await.unwrap_err();
    assert!(error.contains("CertificateRequired"), "{error}");

    // The same probe with a certificate gets through: the refusal above was the missing
    // certificate, not the probe.
    probe(server.addr, client_config(&pki, &pki.front_end()))
        .await
        .unwrap();
    server.stop().await;
}

#[tokio::test]
async fn handshake_refused_for_a_certificate_from_another_ca() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new("test CA");
    let other = Pki::new("some other CA");
    let server = TestServer::start(dir.path(), &pki).await;

    // Same SAN as a real front-end, but issued by a CA the server does not trust.
    let impostor = other.front_end();
    let config =
        control::client::client_config(pki.roots(), impostor.chain.clone(), impostor.key())
            .unwrap();
    let error = probe(server.addr, config.clone()).await.unwrap_err();
    assert!(error.contains("UnknownCA"), "{error}");

    // And no RPC gets through either.
    let refused = channel_named(server.addr, config, SERVER_NAME).await;
    if let Ok(channel) = refused {
        let status = FrontEndClient::new(channel)
            .issue_media_credentials(IssueMediaCredentialsRequest {
                user: "alice".into(),
                lifetime_seconds: None,
            })
            .await
            .unwrap_err();
        assert!(format!("{status:?}").contains("UnknownCA"), "{status:?}");
    }
    server.stop().await;
}

#[tokio::test]
async fn handshake_refused_for_a_tls12_client() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new("test CA");
    let server = TestServer::start(dir.path(), &pki).await;

    let identity = pki.front_end();
    let tls12 = rustls::ClientConfig::builder_with_provider(control::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .with_root_certificates(pki.roots())
        .with_client_auth_cert(identity.chain.clone(), identity.key())
        .unwrap();
    let error = probe(server.addr, Arc::new(tls12)).await.unwrap_err();
    assert!(error.starts_with("handshake:"), "{error}");
    assert!(error.contains("ProtocolVersion"), "{error}");
    server.stop().await;
}

#[tokio::test]
async fn handshake_refused_for_a_revoked_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new("test CA");
    write_tls_files(dir.path(), &pki, &pki.server(&[SERVER_NAME], 1));
    let revoked = pki.client_dns(FRONT_END, 66);
    std::fs::write(dir.path().join("revoked.crl"), pki.crl_pem(&[66])).unwrap();
    let server = TestServer::start_with(
        dir.path(),
        &config_text(r#"crls = ["revoked.crl"]"#),
        |_| {},
    )
    .await;

    let error = probe(server.addr, client_config(&pki, &revoked))
        .await
        .unwrap_err();
    assert!(error.contains("CertificateRevoked"), "{error}");
    // A certificate the CRL does not list still works.
    probe(server.addr, client_config(&pki, &pki.front_end()))
        .await
        .unwrap();
    server.stop().await;
}

#[tokio::test]
async fn each_role_may_call_only_its_own_rpcs() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new("test CA");
    let server = TestServer::start(dir.path(), &pki).await;

    let front_end = channel(server.addr, client_config(&pki, &pki.front_end())).await;
    let agent = channel(server.addr, client_config(&pki, &pki.agent())).await;
    let operator = channel(server.addr, client_config(&pki, &pki.operator())).await;
    let nobody = channel(
        server.addr,
        client_config(&pki, &pki.client_dns(NOBODY, 20)),
    )
    .await;

    // Allowed.
    FrontEndClient::new(front_end.clone())
        .set_access_policy(SetAccessPolicyRequest {
            policy: Some(Default::default()),
        })
        .await
        .unwrap();
    OperatorClient::new(operator.clone())
        .list_agents(ListAgentsRequest {})
        .await
        .unwrap();

    // Not allowed: a valid certificate of the wrong role.
    let denied = [
        OperatorClient::new(front_end.clone())
            .list_agents(ListAgentsRequest {})
            .await
            .unwrap_err(),
        FrontEndClient::new(operator.clone())
            .issue_media_credentials(IssueMediaCredentialsRequest {
                user: "alice".into(),
                lifetime_seconds: None,
            })
            .await
            .unwrap_err(),
        FrontEndClient::new(agent.clone())
            .register_conference(RegisterConferenceRequest::default())
            .await
            .unwrap_err(),
        RelayAgentClient::new(front_end.clone())
            .register_agent(proto::control::v1::RegisterAgentRequest::default())
            .await
            .unwrap_err(),
        OperatorClient::new(nobody.clone())
            .list_agents(ListAgentsRequest {})
            .await
            .unwrap_err(),
    ];
    for status in denied {
        assert_eq!(status.code(), Code::PermissionDenied, "{status}");
    }
    let status = OperatorClient::new(front_end)
        .list_agents(ListAgentsRequest {})
        .await
        .unwrap_err();
    assert!(
        status.message().contains("operator") && status.message().contains(FRONT_END),
        "the refusal says what is needed and who asked: {}",
        status.message()
    );
    server.stop().await;
}

#[tokio::test]
async fn a_server_certificate_that_does_not_name_the_server_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new("test CA");
    write_tls_files(
        dir.path(),
        &pki,
        &pki.server(&["elsewhere.rampart.test"], 1),
    );
    let config = control::Config::parse(&config_text(""), dir.path()).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let error = control::serve(config, listener, Default::default())
        .await
        .unwrap_err()
        .to_string();
    assert!(error.contains("tls.certificate"), "{error}");
    assert!(error.contains(SERVER_NAME), "{error}");
}
