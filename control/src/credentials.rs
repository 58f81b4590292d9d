//! Media credentials in the TURN REST API scheme (draft-uberti-behave-turn-rest): username
//! `expiry:user`, password base64(HMAC-SHA1(secret, username)). Relay agents hold the same
//! secret and check credentials with no round trip to the control service, so calls set up
//! with issued credentials survive a control outage.

use proto::control::v1::UserRevocation;

/// STUN USERNAME is at most 513 bytes (RFC 8489 §14.3); the user identity gets 256 of them,
/// leaving room for the expiry and for a realm-qualified form.
pub const MAX_USER_LEN: usize = 256;

/// Why a user identity cannot become a TURN username.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UserError {
    #[error("the user identity is empty")]
    Empty,
    #[error("the user identity is {0} bytes; at most {MAX_USER_LEN}")]
    TooLong(usize),
    #[error("the user identity contains whitespace or a control character")]
    BadCharacter,
}

/// A user identity fit for the user part of a REST username.
pub fn check_user(user: &str) -> Result<(), UserError> {
    if user.is_empty() {
        return Err(UserError::Empty);
    }
    if user.len() > MAX_USER_LEN {
        return Err(UserError::TooLong(user.len()));
    }
    // Whitespace and control characters would make the username ambiguous in logs and
    // configuration files, and no SIP URI or account name contains them.
    if user.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(UserError::BadCharacter);
    }
    Ok(())
}

pub use rampart_turn::auth::credentials::rest_password;

/// Issued credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MediaCredentials {
    pub username: String,
    pub password: String,
    pub expires_at_unix: u64,
}

/// Mints credentials for `user` at unix time `now`, valid for `lifetime_secs`.
///
/// After a revocation, agents refuse the user's credentials expiring at or before
/// `refuse_expiry_through_unix`; new ones must expire after it or they would be refused too,
/// so their expiry is pushed past it. This may make them outlive the lifetime asked for, by
/// at most the configured lifetime, and only for a user revoked within the last lifetime.
pub fn issue(
    secret: &[u8],
    user: &str,
    now_unix: u64,
    lifetime_secs: u64,
    revocation: Option<&UserRevocation>,
) -> MediaCredentials {
    let mut expires_at_unix = now_unix.saturating_add(lifetime_secs);
    if let Some(revocation) = revocation {
        expires_at_unix =
            expires_at_unix.max(revocation.refuse_expiry_through_unix.saturating_add(1));
    }
    let username = format!("{expires_at_unix}:{user}");
    let password = rest_password(secret, &username);
    MediaCredentials {
        username,
        password,
        expires_at_unix,
    }
}

/// The revocation of `user` at unix time `now`, when credentials are issued for at most
/// `max_lifetime_secs`.
///
/// Every credential issued before now expires at or before `now + max_lifetime` (or, if
/// the user was revoked before and [`issue`] pushed an expiry past that older horizon, at
/// or before the older horizon + 1), so refusing expiries through the later of the two ends
/// all of them. Lowering the configured lifetime within one lifetime of a revocation
/// narrows the horizon for credentials issued under the old, longer lifetime: lower it
/// only when no revocation is pending, or revoke again a lifetime later.
pub fn revocation(
    user: &str,
    now_unix: u64,
    max_lifetime_secs: u64,
    previous: Option<&UserRevocation>,
) -> UserRevocation {
    let mut refuse_expiry_through_unix = now_unix.saturating_add(max_lifetime_secs);
    if let Some(previous) = previous {
        refuse_expiry_through_unix =
            refuse_expiry_through_unix.max(previous.refuse_expiry_through_unix.saturating_add(1));
    }
    UserRevocation {
        user: user.to_owned(),
        revoked_at_unix: now_unix,
        refuse_expiry_through_unix,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"rampart-development-secret-change-me";

    #[test]
    fn password_matches_an_independent_implementation() {
        // Computed with Python's hmac/hashlib/base64 modules.
        assert_eq!(
            rest_password(SECRET, "1700003600:sip:alice@example.com"),
            "YuK1zuWfjwa6E2RTw5mOZL27vVs="
        );
    }

    #[test]
    fn username_is_expiry_colon_user() {
        let issued = issue(SECRET, "sip:alice@example.com", 1_700_000_000, 3600, None);
        assert_eq!(issued.username, "1700003600:sip:alice@example.com");
        assert_eq!(issued.expires_at_unix, 1_700_003_600);
        assert_eq!(issued.password, "YuK1zuWfjwa6E2RTw5mOZL27vVs=");
    }

    #[test]
    fn credentials_after_a_revocation_expire_after_its_horizon() {
        let revocation = UserRevocation {
            user: "bob".into(),
            revoked_at_unix: 1000,
            refuse_expiry_through_unix: 1000 + 86_400,
        };
        let before = issue(SECRET, "bob", 1000, 86_400, None);
        assert!(before.expires_at_unix <= revocation.refuse_expiry_through_unix);
        let after = issue(SECRET, "bob", 1000, 600, Some(&revocation));
        assert_eq!(after.expires_at_unix, 1000 + 86_400 + 1);
        let much_later = issue(SECRET, "bob", 200_000, 600, Some(&revocation));
        assert_eq!(much_later.expires_at_unix, 200_600);
    }

    #[test]
    fn a_second_revocation_covers_credentials_issued_between_the_two() {
        let first = revocation("bob", 1000, 600, None);
        assert_eq!(first.refuse_expiry_through_unix, 1600);
        // Issued in the same second as the first revocation, after it.
        let between = issue(SECRET, "bob", 1000, 600, Some(&first));
        assert_eq!(between.expires_at_unix, 1601);
        let second = revocation("bob", 1000, 600, Some(&first));
        assert!(between.expires_at_unix <= second.refuse_expiry_through_unix);
        let after = issue(SECRET, "bob", 1000, 600, Some(&second));
        assert!(after.expires_at_unix > second.refuse_expiry_through_unix);
    }

    #[test]
    fn user_identities_are_checked() {
        assert_eq!(check_user("sip:alice@example.com"), Ok(()));
        assert_eq!(check_user(""), Err(UserError::Empty));
        assert_eq!(check_user("a b"), Err(UserError::BadCharacter));
        assert_eq!(check_user("a\u{0}b"), Err(UserError::BadCharacter));
        assert_eq!(check_user(&"x".repeat(257)), Err(UserError::TooLong(257)));
    }
}
