//! Username -> password lookup: static users for development, and time-limited credentials in
//! the TURN REST API scheme (username `expiry:user`, or a bare `expiry`, which the scheme
//! allows and coturn accepts; password base64(HMAC-SHA1(secret, username))) that front-ends
//! mint without talking to the relay.

use std::collections::HashMap;

use base64::Engine;
use hmac::{Hmac, Mac};
use sha1::Sha1;

/// Front-ends mint `expiry = their now + lifetime`; their clock may run a little ahead of
/// ours, and a credential minted for exactly the maximum lifetime must still be accepted.
const CLOCK_SKEW_SECS: u64 = 60;

/// Why a username has no usable password. All of them answer 401 on the wire: a client must
/// not learn whether a user exists.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CredentialError {
    #[error("unknown user")]
    UnknownUser,
    #[error("REST API username is neither `expiry:user` nor `expiry`")]
    MalformedRestUsername,
    #[error("REST API credential expired at {expiry} (now {now})")]
    Expired { expiry: u64, now: u64 },
    #[error("REST API credential expires at {expiry}, beyond the accepted maximum lifetime")]
    LifetimeTooLong { expiry: u64 },
    #[error("the user was revoked")]
    Revoked,
}

/// The shared secrets of the REST API scheme: the current one and, during a rotation, the
/// previous one, so credentials minted just before the switch keep working.
#[derive(Clone)]
pub struct RestSecrets {
    secrets: Vec<Vec<u8>>,
    max_lifetime_secs: u64,
}

impl std::fmt::Debug for RestSecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RestSecrets")
            .field(
                "secrets",
                &format_args!("[{} redacted]", self.secrets.len()),
            )
            .field("max_lifetime_secs", &self.max_lifetime_secs)
            .finish()
    }
}

impl RestSecrets {
    /// At most two secrets are meaningful (current and previous); configuration validation
    /// enforces it.
    pub fn new(secrets: Vec<Vec<u8>>, max_lifetime_secs: u64) -> Self {
        RestSecrets {
            secrets,
            max_lifetime_secs,
        }
    }

    /// The password a front-end hands out for `username` under the first (current) secret.
    pub fn password_for(&self, username: &str) -> Option<String> {
        self.secrets.first().map(|s| rest_password(s, username))
    }
}

/// base64(HMAC-SHA1(secret, username)), the TURN REST API password.
pub fn rest_password(secret: &[u8], username: &str) -> String {
    let mut mac = Hmac::<Sha1>::new_from_slice(secret).expect("HMAC accepts any key length");
    mac.update(username.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

/// A user that passed the credential lookup; `quota_key` is what allocation quotas count
/// (the user part of a REST username, so minting many usernames does not escape the quota).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidates {
    pub quota_key: String,
    pub passwords: Vec<String>,
    /// False for a REST username that is a bare expiry: it names nobody, so no front-end
    /// can have authorized it to reach anyone (consent's `authorized` mode).
    pub named: bool,
}

/// Everyone the relay accepts.
#[derive(Clone, Debug, Default)]
pub struct Credentials {
    static_users: HashMap<String, String>,
    rest: Option<RestSecrets>,
    /// User -> unix time up to which their credentials are refused.
    revoked: HashMap<String, u64>,
}

impl Credentials {
    pub fn new(static_users: HashMap<String, String>, rest: Option<RestSecrets>) -> Self {
        Credentials {
            static_users,
            rest,
            revoked: HashMap::new(),
        }
    }

    /// Refuse `user`'s credentials from now on: a REST credential of theirs expiring at or
    /// before `until_unix` (so every one minted before the revocation, whose expiry is at most
    /// now + the front-end's lifetime), and a static user until `until_unix`. Credentials
    /// minted later expire later and work again: the front-end decides.
    pub fn revoke(&mut self, user: &str, until_unix: u64) {
        let until = self.revoked.entry(user.to_owned()).or_default();
        *until = (*until).max(until_unix);
    }

    /// Forget revocations that can no longer refuse anything.
    pub fn prune_revocations(&mut self, now_unix: u64) {
        self.revoked.retain(|_, until| *until > now_unix);
    }

    /// Whether `user` is revoked at `now_unix` (their static credentials refused).
    pub fn is_revoked(&self, user: &str, now_unix: u64) -> bool {
        self.revoked
            .get(user)
            .is_some_and(|until| now_unix < *until)
    }

    /// Whether any revocation is held (and [`Credentials::prune_revocations`] has work).
    pub fn has_revocations(&self) -> bool {
        !self.revoked.is_empty()
    }

    /// The passwords that may have produced a request from `username` at unix time `now`:
    /// one for a static user, one per secret for a REST username.
    pub fn candidates(&self, username: &str, now_unix: u64) -> Result<Candidates, CredentialError> {
        if let Some(password) = self.static_users.get(username) {
            if self
                .revoked
                .get(username)
                .is_some_and(|until| now_unix < *until)
            {
                return Err(CredentialError::Revoked);
            }
            return Ok(Candidates {
                quota_key: username.to_owned(),
                passwords: vec![password.clone()],
                named: true,
            });
        }
        let Some(rest) = &self.rest else {
            return Err(CredentialError::UnknownUser);
        };
        // A bare expiry names no user: its quota is the username's own, and no revocation
        // (which names a user) reaches it before it expires.
        let named = username.contains(':');
        let (expiry, user) = username.split_once(':').unwrap_or((username, username));
        let expiry: u64 = expiry
            .parse()
            .map_err(|_| CredentialError::MalformedRestUsername)?;
        if user.is_empty() {
            return Err(CredentialError::MalformedRestUsername);
        }
        if expiry <= now_unix {
            return Err(CredentialError::Expired {
                expiry,
                now: now_unix,
            });
        }
        if expiry - now_unix > rest.max_lifetime_secs + CLOCK_SKEW_SECS {
            return Err(CredentialError::LifetimeTooLong { expiry });
        }
        if self.revoked.get(user).is_some_and(|until| expiry <= *until) {
            return Err(CredentialError::Revoked);
        }
        Ok(Candidates {
            quota_key: user.to_owned(),
            named,
            passwords: rest
                .secrets
                .iter()
                .map(|s| rest_password(s, username))
                .collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn creds() -> Credentials {
        Credentials::new(
            HashMap::from([("alice".to_owned(), "wonderland".to_owned())]),
            Some(RestSecrets::new(
                vec![b"new-secret".to_vec(), b"old-secret".to_vec()],
                86_400,
            )),
        )
    }

    #[test]
    fn static_user_has_its_password() {
        let c = creds().candidates("alice", 0).unwrap();
        assert_eq!(c.passwords, vec!["wonderland"]);
        assert_eq!(c.quota_key, "alice");
    }

    #[test]
    fn rest_username_accepts_both_secrets_and_quota_is_the_user_part() {
        let c = creds().candidates("1000:bob", 500).unwrap();
        assert_eq!(c.quota_key, "bob");
        assert_eq!(
            c.passwords,
            vec![
                rest_password(b"new-secret", "1000:bob"),
                rest_password(b"old-secret", "1000:bob")
            ]
        );
    }

    #[test]
    fn a_bare_expiry_is_a_rest_username_of_its_own() {
        let c = creds().candidates("1000", 500).unwrap();
        assert_eq!(c.quota_key, "1000", "the whole username is the quota key");
        assert_eq!(c.passwords[0], rest_password(b"new-secret", "1000"));
        assert!(matches!(
            creds().candidates("1000", 1000),
            Err(CredentialError::Expired { .. })
        ));
    }

    #[test]
    fn rest_password_matches_the_published_scheme() {
        // echo -n "1700000000:alice" | openssl dgst -sha1 -hmac secret -binary | base64
        assert_eq!(
            rest_password(b"secret", "1700000000:alice"),
            "d8soP47RbdIKLDUOpnJPVQyq5Ts="
        );
    }

    #[test]
    fn revoked_users_are_refused_until_their_old_credentials_have_expired() {
        let mut c = creds();
        c.revoke("bob", 5000);
        c.revoke("alice", 100);
        assert_eq!(c.candidates("4000:bob", 10), Err(CredentialError::Revoked));
        assert_eq!(c.candidates("5000:bob", 10), Err(CredentialError::Revoked));
        assert!(
            c.candidates("5001:bob", 10).is_ok(),
            "minted after the revocation"
        );
        assert!(c.candidates("4000:carol", 10).is_ok());
        assert_eq!(c.candidates("alice", 99), Err(CredentialError::Revoked));
        assert!(c.candidates("alice", 100).is_ok());
        c.prune_revocations(5000);
        assert!(
            c.candidates("4000:bob", 10).is_ok(),
            "pruned once nothing can match"
        );
    }

    #[test]
    fn expired_or_too_long_rest_credentials_are_refused() {
        let c = creds();
        assert!(matches!(
            c.candidates("1000:bob", 1000),
            Err(CredentialError::Expired { .. })
        ));
        assert!(matches!(
            c.candidates("1000000:bob", 0),
            Err(CredentialError::LifetimeTooLong { .. })
        ));
        // Exactly the maximum, from a front-end whose clock is a few seconds ahead: accepted.
        assert!(c.candidates("86430:bob", 0).is_ok());
        assert!(c.candidates("86461:bob", 0).is_err());
        assert_eq!(
            c.candidates("bob", 0),
            Err(CredentialError::MalformedRestUsername)
        );
        assert_eq!(
            c.candidates("1000:", 0),
            Err(CredentialError::MalformedRestUsername)
        );
        let static_only = Credentials::new(HashMap::new(), None);
        assert_eq!(
            static_only.candidates("1000:bob", 0),
            Err(CredentialError::UnknownUser)
        );
        assert_eq!(
            c.candidates("soon:bob", 0),
            Err(CredentialError::MalformedRestUsername)
        );
    }
}
