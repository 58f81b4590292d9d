//! `[sip]`: the Access Edge. Names, certificates and peers on both sides, the access policy
//! used until the control plane sends one, and the abuse limits.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::Deserialize;

use super::{ConfigError, certificate_and_key, invalid, pem_certificates, read_file};
use rampart_rate_limit::RateLimit;
use rampart_sip::Limits;
use rampart_sip::guard::GuardSettings;
use rampart_sip::policy::{AccessPolicy, FederationPolicy};
use rampart_sip::proxy::ProxySettings;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSip {
    #[serde(default = "external_default")]
    external: Vec<SocketAddr>,
    #[serde(default)]
    external_tcp: Vec<SocketAddr>,
    external_host: String,
    certificate: PathBuf,
    private_key: PathBuf,
    domains: Vec<String>,
    internal: SocketAddr,
    internal_host: String,
    internal_certificate: PathBuf,
    internal_private_key: PathBuf,
    internal_ca: PathBuf,
    token_secret: Option<PathBuf>,
    #[serde(default)]
    next_hop: Vec<RawPeer>,
    #[serde(default)]
    federation: RawFederation,
    #[serde(default)]
    policy: RawPolicy,
    #[serde(default)]
    limits: RawLimits,
}

fn external_default() -> Vec<SocketAddr> {
    vec![SocketAddr::from(([0, 0, 0, 0], 5061))]
}

/// A SIP server by name (what its certificate must say) and port, with an optional fixed
/// address instead of a DNS lookup.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPeer {
    host: String,
    #[serde(default = "sip_tls_port")]
    port: u16,
    address: Option<SocketAddr>,
}

fn sip_tls_port() -> u16 {
    5061
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFederation {
    partner_ca: Option<PathBuf>,
    #[serde(default)]
    route: Vec<RawRoute>,
    #[serde(default)]
    dns_servers: Vec<SocketAddr>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    domain: String,
    host: String,
    #[serde(default = "sip_tls_port")]
    port: u16,
    address: Option<SocketAddr>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawPolicy {
    remote_users: bool,
    anonymous_users: bool,
    federation: bool,
    allowed_domains: Vec<String>,
    blocked_domains: Vec<String>,
    partner_requests_per_second: f64,
    partner_burst: f64,
}

impl Default for RawPolicy {
    fn default() -> Self {
        let policy = AccessPolicy::default();
        RawPolicy {
            remote_users: policy.remote_users,
            anonymous_users: policy.anonymous_users,
            federation: policy.federation.enabled,
            allowed_domains: Vec::new(),
            blocked_domains: Vec::new(),
            partner_requests_per_second: policy.federation.partner_rate.per_second,
            partner_burst: policy.federation.partner_rate.burst,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawLimits {
    max_message_bytes: usize,
    max_headers: usize,
    max_line_bytes: usize,
    requests_per_second: f64,
    request_burst: f64,
    ban_after: u32,
    ban_seconds: u64,
    connections_per_source: usize,
    connections_total: usize,
    tls_handshake_timeout: u64,
    idle_timeout: u64,
    message_timeout: u64,
    keepalive_interval: u64,
}

impl Default for RawLimits {
    fn default() -> Self {
        let limits = Limits::default();
        let guard = GuardSettings::default();
        RawLimits {
            max_message_bytes: limits.max_message_bytes,
            max_headers: limits.max_headers,
            max_line_bytes: limits.max_line_bytes,
            requests_per_second: guard.requests.per_second,
            request_burst: guard.requests.burst,
            ban_after: guard.ban_after,
            ban_seconds: guard.ban_for.as_secs(),
            connections_per_source: guard.connections_per_source,
            connections_total: guard.connections_total,
            tls_handshake_timeout: 5,
            idle_timeout: 300,
            message_timeout: 10,
            keepalive_interval: 30,
        }
    }
}

/// A SIP server to connect to: its certificate must name `host`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SipPeer {
    pub host: String,
    pub port: u16,
    /// Connect here instead of resolving `host`.
    pub address: Option<SocketAddr>,
}

/// The certificate the edge presents to partners, and the roots their certificates must
/// chain to.
#[derive(Clone)]
pub struct PartnerTls {
    pub roots: Arc<rustls::RootCertStore>,
    pub certificate: Vec<CertificateDer<'static>>,
    pub private_key: Arc<PrivateKeyDer<'static>>,
}

#[derive(Clone)]
pub struct SipSettings {
    pub external: Vec<SocketAddr>,
    pub external_tcp: Vec<SocketAddr>,
    pub external_tls: Arc<rustls::ServerConfig>,
    pub internal: SocketAddr,
    pub internal_tls: Arc<rustls::ServerConfig>,
    /// Mutual TLS to the next hop.
    pub next_hop_tls: Arc<rustls::ClientConfig>,
    /// In order: the first that answers is used, the others on failure.
    pub next_hops: Vec<SipPeer>,
    /// `None`: no partner CA, so no federation in either direction.
    pub partner_tls: Option<PartnerTls>,
    /// Static routes by partner domain; other domains are found by DNS SRV.
    pub routes: HashMap<String, SipPeer>,
    /// Name servers for SRV/A/AAAA lookups; empty: the system's.
    pub dns_servers: Vec<SocketAddr>,
    pub proxy: ProxySettings,
    /// The secret the edge's routing tokens are sealed with; `None`: a random one per start.
    pub token_secret: Option<Arc<[u8]>>,
    pub policy: AccessPolicy,
    pub limits: Limits,
    pub guard: GuardSettings,
    pub tls_handshake_timeout: Duration,
    pub idle_timeout: Duration,
    pub message_timeout: Duration,
    pub keepalive_interval: Duration,
}

impl fmt::Debug for SipSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SipSettings")
            .field("external", &self.external)
            .field("internal", &self.internal)
            .field("next_hops", &self.next_hops)
            .finish_non_exhaustive()
    }
}

fn domain_name(key: &str, name: &str) -> Result<String, ConfigError> {
    let lower = name.trim().trim_end_matches('.').to_ascii_lowercase();
    if rampart_sip::uri::parse_host_port(&lower)
        .is_some_and(|(host, port)| port.is_none() && !host.starts_with('['))
    {
        Ok(lower)
    } else {
        Err(invalid(key, format!("{name:?} is not a DNS name")))
    }
}

fn roots(
    key: &str,
    base_dir: &Path,
    path: &Path,
) -> Result<Arc<rustls::RootCertStore>, ConfigError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in pem_certificates(key, &read_file(key, base_dir, path)?)? {
        roots
            .add(cert)
            .map_err(|e| invalid(key, format!("unusable CA certificate: {e}")))?;
    }
    Ok(Arc::new(roots))
}

fn peer(
    key: &str,
    host: &str,
    port: u16,
    address: Option<SocketAddr>,
) -> Result<SipPeer, ConfigError> {
    if port == 0 {
        return Err(invalid(key, "port 0"));
    }
    Ok(SipPeer {
        host: domain_name(key, host)?,
        port,
        address,
    })
}

impl RawSip {
    pub(super) fn validate(&self, base_dir: &Path) -> Result<SipSettings, ConfigError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls_error = |key: &'static str| move |e: rustls::Error| invalid(key, e.to_string());
        let (certificate, private_key) = certificate_and_key(
            base_dir,
            ("sip.certificate", &self.certificate),
            ("sip.private_key", &self.private_key),
        )?;
        let (internal_certificate, internal_key) = certificate_and_key(
            base_dir,
            ("sip.internal_certificate", &self.internal_certificate),
            ("sip.internal_private_key", &self.internal_private_key),
        )?;
        let internal_roots = roots("sip.internal_ca", base_dir, &self.internal_ca)?;
        let partner_roots = self
            .federation
            .partner_ca
            .as_ref()
            .map(|path| roots("sip.federation.partner_ca", base_dir, path))
            .transpose()?;

        // Outside: any client may connect; a partner edge proves its domain with a
        // certificate from the partner CA.
        let external_builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(tls_error("sip"))?;
        let external_builder = match &partner_roots {
            Some(roots) => {
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    roots.clone(),
                    provider.clone(),
                )
                .allow_unauthenticated()
                .build()
                .map_err(|e| invalid("sip.federation.partner_ca", e.to_string()))?;
                external_builder.with_client_cert_verifier(verifier)
            }
            None => external_builder.with_no_client_auth(),
        };
        let external_tls = external_builder
            .with_single_cert(certificate.clone(), private_key.clone_key())
            .map_err(|e| {
                invalid(
                    "sip.private_key",
                    format!("does not fit sip.certificate: {e}"),
                )
            })?;

        let internal_verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            internal_roots.clone(),
            provider.clone(),
        )
        .build()
        .map_err(|e| invalid("sip.internal_ca", e.to_string()))?;
        let internal_tls = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(tls_error("sip"))?
            .with_client_cert_verifier(internal_verifier)
            .with_single_cert(internal_certificate.clone(), internal_key.clone_key())
            .map_err(|e| {
                invalid(
                    "sip.internal_private_key",
                    format!("does not fit sip.internal_certificate: {e}"),
                )
            })?;
        let next_hop_tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(tls_error("sip"))?
            .with_root_certificates(internal_roots)
            .with_client_auth_cert(internal_certificate, internal_key)
            .map_err(|e| invalid("sip.internal_private_key", e.to_string()))?;

        let external_host = domain_name("sip.external_host", &self.external_host)?;
        let internal_host = domain_name("sip.internal_host", &self.internal_host)?;
        if self.domains.is_empty() {
            return Err(invalid(
                "sip.domains",
                "list the enterprise's SIP domains (e.g. [\"corp.example\"])",
            ));
        }
        let domains = self
            .domains
            .iter()
            .map(|domain| domain_name("sip.domains", domain))
            .collect::<Result<HashSet<_>, _>>()?;
        if self.next_hop.is_empty() {
            return Err(invalid(
                "sip.next_hop",
                "add at least one [[sip.next_hop]] (host = the Director or front-end pool FQDN)",
            ));
        }
        let next_hops = self
            .next_hop
            .iter()
            .map(|raw| peer("sip.next_hop", &raw.host, raw.port, raw.address))
            .collect::<Result<Vec<_>, _>>()?;
        let mut routes = HashMap::new();
        for route in &self.federation.route {
            let domain = domain_name("sip.federation.route.domain", &route.domain)?;
            if domains.contains(&domain) {
                return Err(invalid(
                    "sip.federation.route",
                    format!("{domain} is one of sip.domains"),
                ));
            }
            routes.insert(
                domain,
                peer(
                    "sip.federation.route",
                    &route.host,
                    route.port,
                    route.address,
                )?,
            );
        }
        let token_secret = match &self.token_secret {
            Some(path) => {
                let secret = read_file("sip.token_secret", base_dir, path)?;
                if secret.trim_ascii().len() < 32 {
                    return Err(invalid(
                        "sip.token_secret",
                        "the file must hold at least 32 bytes of secret (e.g. `head -c 48 /dev/urandom | base64`)",
                    ));
                }
                Some(Arc::from(secret.trim_ascii()))
            }
            None => None,
        };
        let policy = self.policy.validate()?;
        if partner_roots.is_none() && (policy.federation.enabled || !routes.is_empty()) {
            return Err(invalid(
                "sip.federation.partner_ca",
                "federation needs the CA partner certificates chain to (e.g. /etc/ssl/certs/ca-certificates.crt)",
            ));
        }
        let limits = &self.limits;
        let positive = [
            ("max_message_bytes", limits.max_message_bytes as u64),
            ("max_headers", limits.max_headers as u64),
            ("max_line_bytes", limits.max_line_bytes as u64),
            ("ban_after", u64::from(limits.ban_after)),
            (
                "connections_per_source",
                limits.connections_per_source as u64,
            ),
            ("connections_total", limits.connections_total as u64),
            ("tls_handshake_timeout", limits.tls_handshake_timeout),
            ("idle_timeout", limits.idle_timeout),
            ("message_timeout", limits.message_timeout),
            ("keepalive_interval", limits.keepalive_interval),
        ];
        if let Some((key, _)) = positive.iter().find(|(_, value)| *value == 0) {
            return Err(invalid(format!("sip.limits.{key}"), "must be at least 1"));
        }
        if !(limits.requests_per_second > 0.0 && limits.request_burst >= 1.0) {
            return Err(invalid(
                "sip.limits.requests_per_second",
                "rate > 0 and request_burst >= 1",
            ));
        }
        Ok(SipSettings {
            external: self.external.clone(),
            external_tcp: self.external_tcp.clone(),
            external_tls: Arc::new(external_tls),
            internal: self.internal,
            internal_tls: Arc::new(internal_tls),
            next_hop_tls: Arc::new(next_hop_tls),
            next_hops,
            partner_tls: partner_roots.map(|roots| PartnerTls {
                roots,
                certificate,
                private_key: Arc::new(private_key),
            }),
            routes,
            dns_servers: self.federation.dns_servers.clone(),
            proxy: ProxySettings {
                external_host,
                external_port: self.external.first().map_or(5061, SocketAddr::port),
                internal_host,
                internal_port: self.internal.port(),
                domains,
            },
            token_secret,
            policy,
            limits: Limits {
                max_message_bytes: limits.max_message_bytes,
                max_headers: limits.max_headers,
                max_line_bytes: limits.max_line_bytes,
            },
            guard: GuardSettings {
                requests: RateLimit {
                    per_second: limits.requests_per_second,
                    burst: limits.request_burst,
                },
                ban_after: limits.ban_after,
                ban_for: Duration::from_secs(limits.ban_seconds),
                connections_per_source: limits.connections_per_source,
                connections_total: limits.connections_total,
            },
            tls_handshake_timeout: Duration::from_secs(limits.tls_handshake_timeout),
            idle_timeout: Duration::from_secs(limits.idle_timeout),
            message_timeout: Duration::from_secs(limits.message_timeout),
            keepalive_interval: Duration::from_secs(limits.keepalive_interval),
        })
    }
}

impl RawPolicy {
    fn validate(&self) -> Result<AccessPolicy, ConfigError> {
        let set = |key: &str, domains: &[String]| -> Result<HashSet<String>, ConfigError> {
            domains
                .iter()
                .map(|domain| domain_name(key, domain))
                .collect()
        };
        if !(self.partner_requests_per_second > 0.0 && self.partner_burst >= 1.0) {
            return Err(invalid(
                "sip.policy.partner_requests_per_second",
                "rate > 0 and partner_burst >= 1",
            ));
        }
        Ok(AccessPolicy {
            remote_users: self.remote_users,
            anonymous_users: self.anonymous_users,
            federation: FederationPolicy {
                enabled: self.federation,
                allowed_domains: set("sip.policy.allowed_domains", &self.allowed_domains)?,
                blocked_domains: set("sip.policy.blocked_domains", &self.blocked_domains)?,
                partner_rate: RateLimit {
                    per_second: self.partner_requests_per_second,
                    burst: self.partner_burst,
                },
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;
    use crate::config::tests::MINIMAL;

    #[test]
    fn sip_section_is_validated_with_the_fix_named() {
        let dir = std::env::temp_dir().join(format!("rampart-config-sip-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let cert = rcgen::generate_simple_self_signed(vec!["sip.corp.example".into()]).unwrap();
        std::fs::write(dir.join("sip.pem"), cert.cert.pem()).unwrap();
        std::fs::write(dir.join("sip.key"), cert.key_pair.serialize_pem()).unwrap();
        let section = "[sip]\nexternal_host = \"sip.corp.example\"\ncertificate = \"sip.pem\"\nprivate_key = \"sip.key\"\n\
            domains = [\"Corp.Example\"]\ninternal = \"127.0.0.1:15061\"\ninternal_host = \"edge-int.corp.local\"\n\
            internal_certificate = \"sip.pem\"\ninternal_private_key = \"sip.key\"\ninternal_ca = \"sip.pem\"\n\
            [[sip.next_hop]]\nhost = \"pool.corp.local\"\naddress = \"127.0.0.1:25061\"\n";
        let parse = |text: &str| Config::parse(&format!("{MINIMAL}\n{text}"), &dir);
        let error = |text: &str| parse(text).unwrap_err().to_string();

        let sip = parse(section).unwrap().sip.unwrap();
        assert!(sip.proxy.domains.contains("corp.example"));
        assert_eq!(sip.external, ["0.0.0.0:5061".parse().unwrap()]);
        assert!(sip.policy.remote_users && !sip.policy.federation.enabled);
        assert!(Config::parse(MINIMAL, &dir).unwrap().sip.is_none());

        let e = error(&section.replace(
            "[[sip.next_hop]]\nhost = \"pool.corp.local\"\naddress = \"127.0.0.1:25061\"\n",
            "",
        ));
        assert!(
            e.contains("sip.next_hop") && e.contains("at least one"),
            "{e}"
        );
        let e = error(&format!("{section}[sip.policy]\nfederation = true\n"));
        assert!(e.contains("sip.federation.partner_ca"), "{e}");
        let e = error(&section.replace(
            "domains = [\"Corp.Example\"]",
            "domains = [\"not a domain\"]",
        ));
        assert!(e.contains("sip.domains"), "{e}");
        let e = error(&format!("{section}[sip.limits]\nmessage_timeout = 0\n"));
        assert!(e.contains("sip.limits.message_timeout"), "{e}");
        std::fs::write(dir.join("short.secret"), "too short").unwrap();
        let e = error(&section.replace(
            "[[sip.next_hop]]",
            "token_secret = \"short.secret\"\n[[sip.next_hop]]",
        ));
        assert!(
            e.contains("sip.token_secret") && e.contains("32 bytes"),
            "{e}"
        );
        let e = error(&format!("{section}[sip.limits]\nno_such_limit = 1\n"));
        assert!(e.contains("no_such_limit"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
