//! Who a caller is: the subject alternative names of its (already verified) client
//! certificate, and the roles those names are allowed to act in.
//!
//! Roles come from SANs rather than the subject CN because SANs are what certificate
//! authorities bind and what RFC 6125 says to match; a CN is free text.

use std::fmt;

pub use control_link::san::{SanError, SanName, san_names};

/// What a caller may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// Internal front-end nodes: media credentials, conferences, policy.
    FrontEnd,
    /// Relay agents: registration and the sync stream.
    RelayAgent,
    /// Operators and monitoring: read-only listings.
    Operator,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::FrontEnd => "front-end",
            Role::RelayAgent => "relay agent",
            Role::Operator => "operator",
        })
    }
}

/// One allow-list entry.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Pattern {
    /// An exact DNS name.
    Dns(String),
    /// `*.suffix`: any single label in front of `suffix` (RFC 6125 §6.4.3 wildcard, left-most
    /// label only), so a pool of front-ends can share one entry.
    DnsWildcard(String),
    /// An exact URI.
    Uri(String),
}

impl Pattern {
    fn matches(&self, name: &SanName) -> bool {
        match (self, name) {
            (Pattern::Dns(want), SanName::Dns(have)) => want == have,
            (Pattern::DnsWildcard(suffix), SanName::Dns(have)) => have
                .split_once('.')
                .is_some_and(|(label, rest)| !label.is_empty() && rest == suffix),
            (Pattern::Uri(want), SanName::Uri(have)) => want == have,
            _ => false,
        }
    }
}

/// The SANs allowed to act in one role.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AllowList {
    patterns: Vec<Pattern>,
}

impl AllowList {
    /// Parses entries of the form `dns:name`, `dns:*.suffix` or `uri:anything`. The error is
    /// the problem and its fix, for the configuration to put behind the key.
    pub fn parse(entries: &[String]) -> Result<Self, String> {
        let mut patterns = Vec::with_capacity(entries.len());
        for entry in entries {
            let pattern = if let Some(name) = entry.strip_prefix("dns:") {
                let name = name.to_ascii_lowercase();
                if let Some(suffix) = name.strip_prefix("*.") {
                    check_dns(entry, suffix)?;
                    if !suffix.contains('.') {
                        return Err(format!(
                            "{entry:?}: a wildcard must sit above at least two labels \
                             (\"dns:*.pool.example.com\"), or it would match whole top-level \
                             domains"
                        ));
                    }
                    Pattern::DnsWildcard(suffix.to_owned())
                } else {
                    check_dns(entry, &name)?;
                    Pattern::Dns(name)
                }
            } else if let Some(uri) = entry.strip_prefix("uri:") {
                if uri.is_empty() || !uri.contains(':') || uri.chars().any(char::is_whitespace) {
                    return Err(format!(
                        "{entry:?}: not a URI; write the URI SAN with its scheme, e.g. \
                         \"uri:spiffe://example.com/front-end\""
                    ));
                }
                Pattern::Uri(uri.to_owned())
            } else {
                return Err(format!(
                    "{entry:?}: say which kind of SAN it is: \"dns:{entry}\" for a DNS name, \
                     \"uri:...\" for a URI"
                ));
            };
            patterns.push(pattern);
        }
        Ok(AllowList { patterns })
    }

    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }

    pub fn allows(&self, names: &[SanName]) -> bool {
        names
            .iter()
            .any(|name| self.patterns.iter().any(|pattern| pattern.matches(name)))
    }
}

fn check_dns(entry: &str, name: &str) -> Result<(), String> {
    if rustls::pki_types::DnsName::try_from(name).is_err() || name.contains('*') {
        return Err(format!(
            "{entry:?}: not a DNS name; write it as in the certificate's SAN, e.g. \
             \"dns:front-end-1.example.com\" (a wildcard only as the whole first label)"
        ));
    }
    Ok(())
}

/// The allow list of every role.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RoleMap {
    pub front_end: AllowList,
    pub relay_agent: AllowList,
    pub operator: AllowList,
}

impl RoleMap {
    /// The roles a certificate with these SANs may act in.
    pub fn roles_of(&self, names: &[SanName]) -> RoleSet {
        RoleSet {
            front_end: self.front_end.allows(names),
            relay_agent: self.relay_agent.allows(names),
            operator: self.operator.allows(names),
        }
    }
}

/// The roles one caller holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RoleSet {
    front_end: bool,
    relay_agent: bool,
    operator: bool,
}

impl RoleSet {
    pub fn contains(&self, role: Role) -> bool {
        match role {
            Role::FrontEnd => self.front_end,
            Role::RelayAgent => self.relay_agent,
            Role::Operator => self.operator,
        }
    }

    pub fn is_empty(&self) -> bool {
        !(self.front_end || self.relay_agent || self.operator)
    }
}

impl fmt::Display for RoleSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let held: Vec<String> = [Role::FrontEnd, Role::RelayAgent, Role::Operator]
            .into_iter()
            .filter(|role| self.contains(*role))
            .map(|role| role.to_string())
            .collect();
        if held.is_empty() {
            f.write_str("no role")
        } else {
            f.write_str(&held.join(", "))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(entries: &[&str]) -> AllowList {
        AllowList::parse(&entries.iter().map(|e| e.to_string()).collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn exact_dns_matches_case_insensitively() {
        let allow = list(&["dns:FE1.Example.com"]);
        assert!(allow.allows(&[SanName::Dns("fe1.example.com".into())]));
        assert!(!allow.allows(&[SanName::Dns("fe2.example.com".into())]));
        assert!(!allow.allows(&[SanName::Uri("fe1.example.com".into())]));
    }

    #[test]
    fn wildcard_matches_one_label_only() {
        let allow = list(&["dns:*.pool.example.com"]);
        assert!(allow.allows(&[SanName::Dns("fe1.pool.example.com".into())]));
        assert!(!allow.allows(&[SanName::Dns("a.b.pool.example.com".into())]));
        assert!(!allow.allows(&[SanName::Dns("pool.example.com".into())]));
        assert!(!allow.allows(&[SanName::Dns(".pool.example.com".into())]));
    }

    #[test]
    fn uri_matches_exactly() {
        let allow = list(&["uri:spiffe://example.com/operator"]);
        assert!(allow.allows(&[SanName::Uri("spiffe://example.com/operator".into())]));
        assert!(!allow.allows(&[SanName::Uri("spiffe://example.com/operator/x".into())]));
    }

    #[test]
    fn bad_entries_are_refused() {
        for bad in [
            "fe1.example.com",
            "dns:",
            "dns:not a name",
            "dns:*.com",
            "dns:fe*.example.com",
            "uri:",
            "uri:no-scheme",
        ] {
            assert!(
                AllowList::parse(&[bad.to_string()]).is_err(),
                "{bad} was accepted"
            );
        }
    }

    #[test]
    fn sans_are_read_from_a_certificate() {
        let mut params =
            rcgen::CertificateParams::new(vec!["FE1.example.com".to_string()]).unwrap();
        params.subject_alt_names.push(rcgen::SanType::URI(
            "spiffe://example.com/fe".try_into().unwrap(),
        ));
        params
            .subject_alt_names
            .push(rcgen::SanType::IpAddress("192.0.2.1".parse().unwrap()));
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        assert_eq!(
            san_names(cert.der()).unwrap(),
            [
                SanName::Dns("fe1.example.com".into()),
                SanName::Uri("spiffe://example.com/fe".into())
            ]
        );
        assert!(san_names(b"not a certificate").is_err());
    }

    #[test]
    fn role_set_display() {
        let roles = RoleMap {
            front_end: list(&["dns:a.example.com"]),
            relay_agent: list(&["dns:a.example.com"]),
            operator: list(&["dns:b.example.com"]),
        }
        .roles_of(&[SanName::Dns("a.example.com".into())]);
        assert_eq!(roles.to_string(), "front-end, relay agent");
        assert!(RoleSet::default().is_empty());
    }
}
