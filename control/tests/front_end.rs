//! The front-end API over mutual TLS: media credentials in the TURN REST API scheme,
//! conferences, policy and user revocation.

mod common;

use base64::Engine as _;
use hmac::{Hmac, Mac as _};
use sha2::{Digest as _, Sha256};
use tonic::Code;

use common::*;
use proto::control::v1::front_end_client::FrontEndClient;
use proto::control::v1::{
    AccessPolicy, FederationPolicy, GetAccessPolicyRequest, IssueMediaCredentialsRequest,
    RegisterConferenceRequest, RevokeConferenceRequest, RevokeUserRequest, SetAccessPolicyRequest,
    UpdateConferenceRequest, register_conference_request,
};

/// The TURN REST API password, computed here independently of the control crate.
fn expected_password(username: &str) -> String {
    let mut mac = Hmac::<sha1::Sha1>::new_from_slice(REST_SECRET.as_bytes()).unwrap();
    mac.update(username.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

#[tokio::test]
async fn a_front_end_obtains_media_credentials_that_verify() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new("test CA");
    let server = TestServer::start(dir.path(), &pki).await;
    let mut front_end =
        FrontEndClient::new(channel(server.addr, client_config(&pki, &pki.front_end())).await);

    let before = now_unix();
    let issued = front_end
        .issue_media_credentials(IssueMediaCredentialsRequest {
            user: "sip:alice@example.com".into(),
            lifetime_seconds: Some(600),
        })
        .await
        .unwrap()
        .into_inner();
    let after = now_unix();
    let (expiry, user) = issued.username.split_once(':').unwrap();
    assert_eq!(user, "sip:alice@example.com");
    let expiry: u64 = expiry.parse().unwrap();
    assert_eq!(expiry, issued.expires_at_unix);
    assert!((before + 600..=after + 600).contains(&expiry), "{expiry}");
    assert_eq!(issued.password, expected_password(&issued.username));
    assert_eq!(
        issued.turn_uris,
        [
            "turn:av.rampart.test:3478?transport=udp",
            "turn:av.rampart.test:443?transport=tcp",
            "turns:av.rampart.test:5349?transport=tcp",
        ]
    );

    // No lifetime: the configured one; more than it: lowered to it.
    for asked in [None, Some(1_000_000)] {
        let issued = front_end
            .issue_media_credentials(IssueMediaCredentialsRequest {
                user: "bob".into(),
                lifetime_seconds: asked,
            })
            .await
            .unwrap()
            .into_inner();
        assert!(issued.expires_at_unix <= now_unix() + 3600);
        assert!(issued.expires_at_unix >= before + 3600);
        assert_eq!(issued.password, expected_password(&issued.username));
    }

    for (user, lifetime) in [("", None), ("two words", None), ("carol", Some(0))] {
        let status = front_end
            .issue_media_credentials(IssueMediaCredentialsRequest {
                user: user.into(),
                lifetime_seconds: lifetime,
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status}");
    }
    server.stop().await;
}

#[tokio::test]
async fn revoking_a_user_moves_new_credentials_past_the_old_ones() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new("test CA");
    let server = TestServer::start(dir.path(), &pki).await;
    let mut front_end =
        FrontEndClient::new(channel(server.addr, client_config(&pki, &pki.front_end())).await);
    let request = || IssueMediaCredentialsRequest {
        user: "mallory".into(),
        lifetime_seconds: None,
    };

    let old = front_end
        .issue_media_credentials(request())
        .await
        .unwrap()
        .into_inner();
    let revocation = front_end
        .revoke_user(RevokeUserRequest {
            user: "mallory".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .revocation
        .unwrap();
    assert!(old.expires_at_unix <= revocation.refuse_expiry_through_unix);
    let new = front_end
        .issue_media_credentials(request())
        .await
        .unwrap()
        .into_inner();
    assert!(new.expires_at_unix > revocation.refuse_expiry_through_unix);
    assert_eq!(new.password, expected_password(&new.username));
    server.stop().await;
}

#[tokio::test]
async fn conferences_and_policy_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new("test CA");
    let server = TestServer::start(dir.path(), &pki).await;
    let mut front_end =
        FrontEndClient::new(channel(server.addr, client_config(&pki, &pki.front_end())).await);
    let expiry = now_unix() + 3600;

    let registered = front_end
        .register_conference(RegisterConferenceRequest {
            conference_id: "weekly-sync".into(),
            session_key: Some(register_conference_request::SessionKey::Key(
                b"correct horse".to_vec(),
            )),
            expires_at_unix: expiry,
            anonymous_allowed: true,
            max_participants: 50,
        })
        .await
        .unwrap()
        .into_inner();
    let conference = registered.conference.unwrap();
    assert_eq!(
        conference.session_key_sha256,
        Sha256::digest(b"correct horse").to_vec(),
        "only the key's hash is kept"
    );

    let duplicate = front_end
        .register_conference(RegisterConferenceRequest {
            conference_id: "weekly-sync".into(),
            session_key: Some(register_conference_request::SessionKey::KeySha256(vec![
                1;
                32
            ])),
            expires_at_unix: expiry,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(duplicate.code(), Code::AlreadyExists);

    let no_key = front_end
        .register_conference(RegisterConferenceRequest {
            conference_id: "keyless".into(),
            expires_at_unix: expiry,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(no_key.code(), Code::InvalidArgument);
    let past = front_end
        .register_conference(RegisterConferenceRequest {
            conference_id: "past".into(),
            session_key: Some(register_conference_request::SessionKey::Key(b"k".to_vec())),
            expires_at_unix: now_unix() - 1,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(past.code(), Code::InvalidArgument);

    let updated = front_end
        .update_conference(UpdateConferenceRequest {
            conference_id: "weekly-sync".into(),
            anonymous_allowed: Some(false),
            max_participants: Some(0),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let changed = updated.conference.unwrap();
    assert!(!changed.anonymous_allowed);
    assert_eq!(changed.max_participants, 0);
    assert_eq!(changed.session_key_sha256, conference.session_key_sha256);
    assert!(updated.revision > registered.revision);

    let missing = front_end
        .update_conference(UpdateConferenceRequest {
            conference_id: "nope".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);

    let revoked = front_end
        .revoke_conference(RevokeConferenceRequest {
            conference_id: "weekly-sync".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(revoked.existed);
    let again = front_end
        .revoke_conference(RevokeConferenceRequest {
            conference_id: "weekly-sync".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!again.existed);
    assert_eq!(again.revision, revoked.revision);

    // Policy: refused when malformed, normalised when stored, read back as stored.
    let bad = front_end
        .set_access_policy(SetAccessPolicyRequest {
            policy: Some(AccessPolicy {
                internal_peer_networks: vec!["10.0.0.0/33".into()],
                ..Default::default()
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert!(
        bad.message().contains("internal_peer_networks"),
        "{}",
        bad.message()
    );
    let set = front_end
        .set_access_policy(SetAccessPolicyRequest {
            policy: Some(AccessPolicy {
                remote_users_enabled: true,
                federation: Some(FederationPolicy {
                    enabled: true,
                    allowed_domains: vec!["Partner.Example".into()],
                    blocked_domains: vec![],
                    partner_requests_per_second: 0,
                }),
                anonymous_users_enabled: true,
                internal_peer_networks: vec!["10.20.0.0/16".into()],
                bandwidth: None,
            }),
        })
        .await
        .unwrap()
        .into_inner();
    let got = front_end
        .get_access_policy(GetAccessPolicyRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.policy, set.policy);
    assert_eq!(got.revision, set.revision);
    assert_eq!(
        got.policy.unwrap().federation.unwrap().allowed_domains,
        ["partner.example"]
    );
    server.stop().await;
}
