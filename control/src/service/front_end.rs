//! The front-end API: media credentials, conferences, access policy, user revocation.

use std::collections::BTreeSet;
use std::sync::Arc;

use ipnet::IpNet;
use sha2::{Digest as _, Sha256};
use tonic::{Request, Response, Status};

use proto::control::v1::front_end_server::FrontEnd;
use proto::control::v1::{
    AccessPolicy, AuthorizeMediaSessionRequest, AuthorizeMediaSessionResponse, BandwidthLimit,
    BandwidthPolicy, Conference, FederationPolicy, GetAccessPolicyRequest, GetAccessPolicyResponse,
    IssueMediaCredentialsRequest, IssueMediaCredentialsResponse, MediaAuthorization,
    RegisterConferenceRequest, RegisterConferenceResponse, RevokeConferenceRequest,
    RevokeConferenceResponse, RevokeMediaSessionRequest, RevokeMediaSessionResponse,
    RevokeUserRequest, RevokeUserResponse, SetAccessPolicyRequest, SetAccessPolicyResponse,
    UpdateConferenceRequest, UpdateConferenceResponse, UserBandwidth, register_conference_request,
    update_conference_request,
};

use super::{blocking, caller, check_id, invalid, now_unix};
use crate::config::CredentialSettings;
use crate::credentials;
use crate::state::State;

/// The longest a media authorization lasts before a front-end renews it.
const MAX_AUTHORIZATION_LIFETIME: u32 = 86_400;

/// Session keys longer than this are not keys but payloads.
const MAX_SESSION_KEY_LEN: usize = 1024;

pub struct FrontEndService {
    state: Arc<State>,
    credentials: Arc<CredentialSettings>,
}

impl FrontEndService {
    pub fn new(state: Arc<State>, credentials: Arc<CredentialSettings>) -> Self {
        FrontEndService { state, credentials }
    }
}

/// The SHA-256 of a session key given either way.
fn key_hash(key: Option<&[u8]>, key_sha256: Option<&[u8]>) -> Result<Option<Vec<u8>>, Status> {
    match (key, key_sha256) {
        (Some(key), _) => {
            if key.is_empty() || key.len() > MAX_SESSION_KEY_LEN {
                return Err(invalid(
                    "key",
                    format!("must be 1 to {MAX_SESSION_KEY_LEN} bytes"),
                ));
            }
            Ok(Some(Sha256::digest(key).to_vec()))
        }
        (None, Some(hash)) => {
            if hash.len() != 32 {
                return Err(invalid(
                    "key_sha256",
                    format!("a SHA-256 is 32 bytes, got {}", hash.len()),
                ));
            }
            Ok(Some(hash.to_vec()))
        }
        (None, None) => Ok(None),
    }
}

fn check_expiry(field: &str, expires_at_unix: u64, now_unix: u64) -> Result<(), Status> {
    if expires_at_unix <= now_unix {
        return Err(invalid(
            field,
            format!("{expires_at_unix} is not in the future (now {now_unix})"),
        ));
    }
    Ok(())
}

/// Lower-cased, checked, de-duplicated DNS names.
fn domains(field: &str, names: &[String]) -> Result<Vec<String>, Status> {
    let mut set = BTreeSet::new();
    for name in names {
        let lower = name.trim().to_ascii_lowercase();
        if rustls::pki_types::DnsName::try_from(lower.as_str()).is_err()
            || lower.contains('*')
            || !lower.contains('.')
        {
            return Err(invalid(
                field,
                format!("{name:?} is not a domain name (e.g. \"partner.example\")"),
            ));
        }
        set.insert(lower);
    }
    Ok(set.into_iter().collect())
}

/// Checks and normalises a whole policy.
fn normalise_policy(policy: AccessPolicy) -> Result<AccessPolicy, Status> {
    let federation = policy.federation.unwrap_or_default();
    let allowed = domains(
        "policy.federation.allowed_domains",
        &federation.allowed_domains,
    )?;
    let blocked = domains(
        "policy.federation.blocked_domains",
        &federation.blocked_domains,
    )?;
    if let Some(both) = allowed.iter().find(|d| blocked.contains(d)) {
        return Err(invalid(
            "policy.federation",
            format!("{both:?} is both allowed and blocked; say which"),
        ));
    }
    let mut networks = BTreeSet::new();
    for network in &policy.internal_peer_networks {
        let parsed: IpNet = network.trim().parse().map_err(|_| {
            invalid(
                "policy.internal_peer_networks",
                format!("{network:?} is not a CIDR prefix (e.g. \"10.0.0.0/8\")"),
            )
        })?;
        if parsed.prefix_len() == 0 {
            // A /0 would let outside users relay to every internal host, which is what the
            // edge exists to prevent.
            return Err(invalid(
                "policy.internal_peer_networks",
                format!(
                    "{network:?} covers every address; list the internal networks media may reach"
                ),
            ));
        }
        networks.insert(parsed.trunc());
    }
    Ok(AccessPolicy {
        remote_users_enabled: policy.remote_users_enabled,
        federation: Some(FederationPolicy {
            enabled: federation.enabled,
            allowed_domains: allowed,
            blocked_domains: blocked,
            partner_requests_per_second: federation.partner_requests_per_second,
        }),
        anonymous_users_enabled: policy.anonymous_users_enabled,
        internal_peer_networks: networks.iter().map(ToString::to_string).collect(),
        bandwidth: policy.bandwidth.map(normalise_bandwidth).transpose()?,
    })
}

/// Checks a bandwidth policy: every rate 0 or at least 1 kbit/s, every burst 0 or at least one
/// full datagram, one entry per user; users sorted, for a stable policy.
fn normalise_bandwidth(policy: BandwidthPolicy) -> Result<BandwidthPolicy, Status> {
    let check = |field: &str, limit: &BandwidthLimit| -> Result<(), Status> {
        if limit.bits_per_second != 0 && limit.bits_per_second < 1000 {
            return Err(invalid(
                field,
                format!(
                    "{} bits per second: a limit is at least 1000 (or 0, none)",
                    limit.bits_per_second
                ),
            ));
        }
        if limit.burst_bytes != 0 && limit.burst_bytes < 1500 {
            return Err(invalid(
                field,
                format!(
                    "a burst of {} bytes: at least 1500 (one full datagram), or 0 for the default",
                    limit.burst_bytes
                ),
            ));
        }
        Ok(())
    };
    if let Some(limit) = &policy.allocation_default {
        check("policy.bandwidth.allocation_default", limit)?;
    }
    let mut users = std::collections::BTreeMap::new();
    for entry in policy.users {
        let user = entry.user.trim().to_owned();
        if user.is_empty() {
            return Err(invalid("policy.bandwidth.users", "a user is empty"));
        }
        if let Some(limit) = &entry.limit {
            check("policy.bandwidth.users", limit)?;
        }
        if users.insert(user.clone(), entry.limit).is_some() {
            return Err(invalid(
                "policy.bandwidth.users",
                format!("{user:?} is listed twice; give one limit per user"),
            ));
        }
    }
    Ok(BandwidthPolicy {
        allocation_default: policy.allocation_default,
        users: users
            .into_iter()
            .map(|(user, limit)| UserBandwidth { user, limit })
            .collect(),
    })
}

#[tonic::async_trait]
impl FrontEnd for FrontEndService {
    async fn issue_media_credentials(
        &self,
        request: Request<IssueMediaCredentialsRequest>,
    ) -> Result<Response<IssueMediaCredentialsResponse>, Status> {
        let caller = caller(&request)?;
        let request = request.into_inner();
        credentials::check_user(&request.user).map_err(|e| invalid("user", e))?;
        let max = self.credentials.lifetime.as_secs();
        let lifetime = match request.lifetime_seconds {
            None => max,
            Some(0) => return Err(invalid("lifetime_seconds", "must be positive")),
            Some(asked) => u64::from(asked).min(max),
        };
        let user = request.user.clone();
        let revocation =
            blocking(&self.state, move |state| state.store().revocation(&user)).await?;
        let now = now_unix();
        // A revocation whose horizon has passed no longer constrains anything.
        let revocation = revocation.filter(|r| r.refuse_expiry_through_unix >= now);
        let issued = credentials::issue(
            &self.credentials.rest_secret,
            &request.user,
            now,
            lifetime,
            revocation.as_ref(),
        );
        tracing::info!(
            front_end = %caller.identity(),
            user = %request.user,
            expires_at = issued.expires_at_unix,
            "media credentials issued"
        );
        Ok(Response::new(IssueMediaCredentialsResponse {
            username: issued.username,
            password: issued.password,
            expires_at_unix: issued.expires_at_unix,
            turn_uris: self.credentials.turn_uris.clone(),
        }))
    }

    async fn register_conference(
        &self,
        request: Request<RegisterConferenceRequest>,
    ) -> Result<Response<RegisterConferenceResponse>, Status> {
        let caller = caller(&request)?;
        let request = request.into_inner();
        check_id("conference_id", &request.conference_id)?;
        let hash = match &request.session_key {
            Some(register_conference_request::SessionKey::Key(key)) => key_hash(Some(key), None)?,
            Some(register_conference_request::SessionKey::KeySha256(hash)) => {
                key_hash(None, Some(hash))?
            }
            None => None,
        }
        .ok_or_else(|| {
            invalid(
                "session_key",
                "missing: set key or key_sha256; outside participants must present it",
            )
        })?;
        let now = now_unix();
        check_expiry("expires_at_unix", request.expires_at_unix, now)?;
        let conference = Conference {
            conference_id: request.conference_id,
            session_key_sha256: hash,
            expires_at_unix: request.expires_at_unix,
            anonymous_allowed: request.anonymous_allowed,
            max_participants: request.max_participants,
            created_at_unix: now,
            updated_at_unix: now,
        };
        let stored = conference.clone();
        let revision = blocking(&self.state, move |state| {
            state.register_conference(stored, now)
        })
        .await?;
        tracing::info!(
            front_end = %caller.identity(),
            conference = %conference.conference_id,
            expires_at = conference.expires_at_unix,
            revision,
            "conference registered"
        );
        Ok(Response::new(RegisterConferenceResponse {
            conference: Some(conference),
            revision,
        }))
    }

    async fn update_conference(
        &self,
        request: Request<UpdateConferenceRequest>,
    ) -> Result<Response<UpdateConferenceResponse>, Status> {
        let caller = caller(&request)?;
        let request = request.into_inner();
        check_id("conference_id", &request.conference_id)?;
        let hash = match &request.session_key {
            Some(update_conference_request::SessionKey::Key(key)) => key_hash(Some(key), None)?,
            Some(update_conference_request::SessionKey::KeySha256(hash)) => {
                key_hash(None, Some(hash))?
            }
            None => None,
        };
        let now = now_unix();
        if let Some(expiry) = request.expires_at_unix {
            check_expiry("expires_at_unix", expiry, now)?;
        }
        let id = request.conference_id.clone();
        let (conference, revision) = blocking(&self.state, move |state| {
            state.update_conference(&id, now, |conference| {
                if let Some(hash) = hash {
                    conference.session_key_sha256 = hash;
                }
                if let Some(expiry) = request.expires_at_unix {
                    conference.expires_at_unix = expiry;
                }
                if let Some(anonymous) = request.anonymous_allowed {
                    conference.anonymous_allowed = anonymous;
                }
                if let Some(cap) = request.max_participants {
                    conference.max_participants = cap;
                }
                conference.updated_at_unix = now;
            })
        })
        .await?;
        tracing::info!(
            front_end = %caller.identity(),
            conference = %conference.conference_id,
            revision,
            "conference updated"
        );
        Ok(Response::new(UpdateConferenceResponse {
            conference: Some(conference),
            revision,
        }))
    }

    async fn revoke_conference(
        &self,
        request: Request<RevokeConferenceRequest>,
    ) -> Result<Response<RevokeConferenceResponse>, Status> {
        let caller = caller(&request)?;
        let request = request.into_inner();
        check_id("conference_id", &request.conference_id)?;
        let id = request.conference_id.clone();
        let (existed, revision) = blocking(&self.state, move |state| {
            Ok(match state.revoke_conference(&id)? {
                Some(revision) => (true, revision),
                None => (false, state.store().revision()?),
            })
        })
        .await?;
        tracing::info!(
            front_end = %caller.identity(),
            conference = %request.conference_id,
            existed,
            revision,
            "conference revoked"
        );
        Ok(Response::new(RevokeConferenceResponse {
            existed,
            revision,
        }))
    }

    async fn set_access_policy(
        &self,
        request: Request<SetAccessPolicyRequest>,
    ) -> Result<Response<SetAccessPolicyResponse>, Status> {
        let caller = caller(&request)?;
        let policy = request.into_inner().policy.ok_or_else(|| {
            invalid(
                "policy",
                "missing; send the whole policy (an empty AccessPolicy turns all outside access off)",
            )
        })?;
        let policy = normalise_policy(policy)?;
        let stored = policy.clone();
        let revision = blocking(&self.state, move |state| state.set_policy(stored)).await?;
        tracing::info!(front_end = %caller.identity(), revision, ?policy, "access policy set");
        Ok(Response::new(SetAccessPolicyResponse {
            policy: Some(policy),
            revision,
        }))
    }

    async fn get_access_policy(
        &self,
        _request: Request<GetAccessPolicyRequest>,
    ) -> Result<Response<GetAccessPolicyResponse>, Status> {
        let (policy, revision) = blocking(&self.state, |state| state.store().policy()).await?;
        Ok(Response::new(GetAccessPolicyResponse {
            policy: Some(policy),
            revision,
        }))
    }

    async fn revoke_user(
        &self,
        request: Request<RevokeUserRequest>,
    ) -> Result<Response<RevokeUserResponse>, Status> {
        let caller = caller(&request)?;
        let request = request.into_inner();
        credentials::check_user(&request.user).map_err(|e| invalid("user", e))?;
        let max_lifetime = self.credentials.lifetime.as_secs();
        let user = request.user.clone();
        let (revocation, revision) = blocking(&self.state, move |state| {
            let now = now_unix();
            let previous = state
                .store()
                .revocation(&user)?
                .filter(|r| r.refuse_expiry_through_unix >= now);
            let revocation = credentials::revocation(&user, now, max_lifetime, previous.as_ref());
            let revision = state.revoke_user(revocation.clone())?;
            Ok((revocation, revision))
        })
        .await?;
        tracing::info!(
            front_end = %caller.identity(),
            user = %request.user,
            refuse_expiry_through = revocation.refuse_expiry_through_unix,
            revision,
            "user revoked"
        );
        Ok(Response::new(RevokeUserResponse {
            revocation: Some(revocation),
            revision,
        }))
    }

    async fn authorize_media_session(
        &self,
        request: Request<AuthorizeMediaSessionRequest>,
    ) -> Result<Response<AuthorizeMediaSessionResponse>, Status> {
        let caller = caller(&request)?;
        let request = request.into_inner();
        credentials::check_user(&request.external_user).map_err(|e| invalid("external_user", e))?;
        credentials::check_user(&request.internal_user).map_err(|e| invalid("internal_user", e))?;
        if request.external_user == request.internal_user {
            return Err(invalid(
                "internal_user",
                "is the external user: a user needs no authorization to reach themselves",
            ));
        }
        if !(1..=MAX_AUTHORIZATION_LIFETIME).contains(&request.lifetime_seconds) {
            return Err(invalid(
                "lifetime_seconds",
                format!("must be 1 to {MAX_AUTHORIZATION_LIFETIME}"),
            ));
        }
        let authorization = MediaAuthorization {
            external_user: request.external_user,
            internal_user: request.internal_user,
            expires_at_unix: now_unix() + u64::from(request.lifetime_seconds),
        };
        let stored = authorization.clone();
        let revision = blocking(&self.state, move |state| state.authorize_media(stored)).await?;
        tracing::info!(
            front_end = %caller.identity(),
            external = %authorization.external_user,
            internal = %authorization.internal_user,
            expires_at = authorization.expires_at_unix,
            revision,
            "media session authorized"
        );
        Ok(Response::new(AuthorizeMediaSessionResponse {
            authorization: Some(authorization),
            revision,
        }))
    }

    async fn revoke_media_session(
        &self,
        request: Request<RevokeMediaSessionRequest>,
    ) -> Result<Response<RevokeMediaSessionResponse>, Status> {
        let caller = caller(&request)?;
        let request = request.into_inner();
        credentials::check_user(&request.external_user).map_err(|e| invalid("external_user", e))?;
        credentials::check_user(&request.internal_user).map_err(|e| invalid("internal_user", e))?;
        let (external, internal) = (request.external_user.clone(), request.internal_user.clone());
        let (revoked, revision) = blocking(&self.state, move |state| {
            match state.revoke_media(&external, &internal)? {
                Some(revision) => Ok((true, revision)),
                None => Ok((false, state.store().revision()?)),
            }
        })
        .await?;
        tracing::info!(
            front_end = %caller.identity(),
            external = %request.external_user,
            internal = %request.internal_user,
            revoked,
            revision,
            "media session revoked"
        );
        Ok(Response::new(RevokeMediaSessionResponse {
            revoked,
            revision,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_is_normalised() {
        let policy = normalise_policy(AccessPolicy {
            remote_users_enabled: true,
            federation: Some(FederationPolicy {
                enabled: true,
                allowed_domains: vec!["Partner.Example".into(), "partner.example".into()],
                blocked_domains: vec!["bad.example".into()],
                partner_requests_per_second: 0,
            }),
            anonymous_users_enabled: false,
            internal_peer_networks: vec!["10.1.2.3/8".into(), "fd00::/8".into()],
            bandwidth: Some(BandwidthPolicy {
                allocation_default: None,
                users: vec![
                    UserBandwidth {
                        user: " sip:zoe@example.com".into(),
                        limit: None,
                    },
                    UserBandwidth {
                        user: "sip:amy@example.com".into(),
                        limit: Some(BandwidthLimit {
                            bits_per_second: 64_000,
                            burst_bytes: 0,
                        }),
                    },
                ],
            }),
        })
        .unwrap();
        let users: Vec<_> = policy
            .bandwidth
            .unwrap()
            .users
            .into_iter()
            .map(|u| u.user)
            .collect();
        assert_eq!(users, ["sip:amy@example.com", "sip:zoe@example.com"]);
        let federation = policy.federation.unwrap();
        assert_eq!(federation.allowed_domains, ["partner.example"]);
        assert_eq!(policy.internal_peer_networks, ["10.0.0.0/8", "fd00::/8"]);
    }

    #[test]
    fn bad_policies_name_the_field() {
        let cases = [
            (
                AccessPolicy {
                    internal_peer_networks: vec!["10.0.0.0".into()],
                    ..Default::default()
                },
                "policy.internal_peer_networks",
            ),
            (
                AccessPolicy {
                    internal_peer_networks: vec!["0.0.0.0/0".into()],
                    ..Default::default()
                },
                "policy.internal_peer_networks",
            ),
            (
                AccessPolicy {
                    federation: Some(FederationPolicy {
                        enabled: true,
                        allowed_domains: vec!["not a domain".into()],
                        blocked_domains: vec![],
                        partner_requests_per_second: 0,
                    }),
                    ..Default::default()
                },
                "policy.federation.allowed_domains",
            ),
            (
                AccessPolicy {
                    federation: Some(FederationPolicy {
                        enabled: true,
                        allowed_domains: vec!["a.example".into()],
                        blocked_domains: vec!["A.example".into()],
                        partner_requests_per_second: 0,
                    }),
                    ..Default::default()
                },
                "policy.federation",
            ),
            (
                AccessPolicy {
                    bandwidth: Some(BandwidthPolicy {
                        allocation_default: Some(BandwidthLimit {
                            bits_per_second: 500,
                            burst_bytes: 0,
                        }),
                        users: vec![],
                    }),
                    ..Default::default()
                },
                "policy.bandwidth.allocation_default",
            ),
            (
                AccessPolicy {
                    bandwidth: Some(BandwidthPolicy {
                        allocation_default: None,
                        users: vec![
                            UserBandwidth {
                                user: "bob".into(),
                                limit: None,
                            },
                            UserBandwidth {
                                user: "bob ".into(),
                                limit: Some(BandwidthLimit {
                                    bits_per_second: 64_000,
                                    burst_bytes: 0,
                                }),
                            },
                        ],
                    }),
                    ..Default::default()
                },
                "policy.bandwidth.users",
            ),
        ];
        for (policy, field) in cases {
            let status = normalise_policy(policy).unwrap_err();
            assert_eq!(status.code(), tonic::Code::InvalidArgument);
            assert!(status.message().starts_with(field), "{}", status.message());
        }
    }

    #[test]
    fn session_keys_are_hashed_or_checked() {
        let hash = key_hash(Some(b"secret"), None).unwrap().unwrap();
        assert_eq!(hash, Sha256::digest(b"secret").to_vec());
        assert_eq!(key_hash(None, Some(&hash)).unwrap().unwrap(), hash);
        assert!(key_hash(None, Some(&[0; 31])).is_err());
        assert!(key_hash(Some(&[]), None).is_err());
        assert_eq!(key_hash(None, None).unwrap(), None);
    }
}
