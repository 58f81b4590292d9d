//! Which access methods the edge serves (from the control plane, or the configuration until
//! the control plane has spoken), and who may federate.

use std::collections::HashSet;
use std::time::Instant;

use rampart_rate_limit::{RateLimit, SourceRateLimiter};

#[derive(Clone, Debug, PartialEq)]
pub struct AccessPolicy {
    pub remote_users: bool,
    pub anonymous_users: bool,
    pub federation: FederationPolicy,
}

#[derive(Clone, Debug, PartialEq)]
pub struct FederationPolicy {
    pub enabled: bool,
    /// Empty: open federation (every domain not blocked, each capped by `partner_rate`).
    pub allowed_domains: HashSet<String>,
    pub blocked_domains: HashSet<String>,
    /// Requests per second (and burst) one partner domain may send under open federation.
    pub partner_rate: RateLimit,
}

impl Default for AccessPolicy {
    fn default() -> Self {
        AccessPolicy {
            remote_users: true,
            anonymous_users: false,
            federation: FederationPolicy {
                enabled: false,
                allowed_domains: HashSet::new(),
                blocked_domains: HashSet::new(),
                partner_rate: RateLimit {
                    per_second: 20.0,
                    burst: 100.0,
                },
            },
        }
    }
}

/// Why federation with a domain was refused; the text is the 403's reason phrase.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FederationRefusal {
    Disabled,
    Blocked,
    NotAllowed,
    RateCapped,
}

impl FederationRefusal {
    pub fn reason_phrase(self) -> &'static str {
        match self {
            FederationRefusal::Disabled => "Forbidden: federation is disabled",
            FederationRefusal::Blocked => "Forbidden: partner domain is blocked",
            FederationRefusal::NotAllowed => "Forbidden: partner domain is not on the allow list",
            FederationRefusal::RateCapped => "Service Unavailable: partner rate cap reached",
        }
    }

    pub fn counter(self) -> &'static str {
        match self {
            FederationRefusal::Disabled => "federation_disabled",
            FederationRefusal::Blocked => "federation_blocked",
            FederationRefusal::NotAllowed => "federation_not_allowed",
            FederationRefusal::RateCapped => "federation_rate_capped",
        }
    }
}

/// The policy and the per-partner buckets of open federation.
pub struct Federation {
    policy: FederationPolicy,
    partner_buckets: SourceRateLimiter<String>,
}

impl Federation {
    pub fn new(policy: FederationPolicy) -> Federation {
        Federation {
            partner_buckets: SourceRateLimiter::new(policy.partner_rate),
            policy,
        }
    }

    pub fn set_policy(&mut self, policy: FederationPolicy) {
        if policy.partner_rate != self.policy.partner_rate {
            self.partner_buckets = SourceRateLimiter::new(policy.partner_rate);
        }
        self.policy = policy;
    }

    /// May `domain` (lower case) federate now? Counts one request against its cap.
    pub fn admit(&mut self, domain: &str, now: Instant) -> Result<(), FederationRefusal> {
        let policy = &self.policy;
        if !policy.enabled {
            return Err(FederationRefusal::Disabled);
        }
        if policy.blocked_domains.contains(domain) {
            return Err(FederationRefusal::Blocked);
        }
        if !policy.allowed_domains.is_empty() {
            return if policy.allowed_domains.contains(domain) {
                Ok(())
            } else {
                Err(FederationRefusal::NotAllowed)
            };
        }
        if self.partner_buckets.allow(domain.to_owned(), now) {
            Ok(())
        } else {
            Err(FederationRefusal::RateCapped)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn federation(allowed: &[&str], blocked: &[&str]) -> Federation {
        Federation::new(FederationPolicy {
            enabled: true,
            allowed_domains: allowed.iter().map(|d| d.to_string()).collect(),
            blocked_domains: blocked.iter().map(|d| d.to_string()).collect(),
            partner_rate: RateLimit {
                per_second: 1.0,
                burst: 2.0,
            },
        })
    }

    #[test]
    fn allow_list_block_list_and_open_federation_cap() {
        let now = Instant::now();
        let mut allow_list = federation(&["partner.example"], &["partner.example"]);
        assert_eq!(
            allow_list.admit("partner.example", now),
            Err(FederationRefusal::Blocked)
        );
        let mut allow_list = federation(&["partner.example"], &[]);
        assert_eq!(
            allow_list.admit("other.example", now),
            Err(FederationRefusal::NotAllowed)
        );
        assert!(
            (0..10).all(|_| allow_list.admit("partner.example", now).is_ok()),
            "no cap on allowed partners"
        );
        let mut open = federation(&[], &["bad.example"]);
        assert_eq!(
            open.admit("bad.example", now),
            Err(FederationRefusal::Blocked)
        );
        assert_eq!(
            (0..5)
                .filter(|_| open.admit("any.example", now).is_ok())
                .count(),
            2,
            "open federation caps each partner"
        );
        assert!(open.admit("another.example", now).is_ok());
        let mut off = federation(&[], &[]);
        off.set_policy(FederationPolicy {
            enabled: false,
            ..off.policy.clone()
        });
        assert_eq!(
            off.admit("any.example", now),
            Err(FederationRefusal::Disabled)
        );
    }
}
