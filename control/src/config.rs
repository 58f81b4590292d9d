//! The control service's configuration: one TOML file, parsed with serde (unknown keys
//! refused) and validated once into typed values. A bad value is refused at start-up with the
//! key and the fix: a control service that starts with, say, an empty front-end allow list
//! would look healthy while refusing every front-end.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::identity::{AllowList, Role, RoleMap};
use crate::tls::TlsFiles;

/// REST API secrets shorter than this are guessable offline from one captured credential.
const MIN_SECRET_LEN: usize = 16;

/// The development configuration that `cargo xtask certs` writes beside the certificates it
/// makes; its role allow lists name exactly the SANs of those certificates.
pub const DEVELOPMENT: &str = include_str!("../config/development.toml");

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Syntax(#[from] toml::de::Error),
    #[error("`{key}`: {problem}")]
    Invalid { key: String, problem: String },
}

fn invalid(key: impl Into<String>, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        problem: problem.into(),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    listen: SocketAddr,
    database: PathBuf,
    tls: RawTls,
    #[serde(default)]
    limits: RawLimits,
    roles: RawRoles,
    credentials: RawCredentials,
    turn: RawTurn,
    #[serde(default)]
    agents: RawAgents,
}

/// What relay agents are told when they register.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAgents {
    /// Seconds between two status reports (health, counters, allocations) of each agent.
    #[serde(default = "report_interval")]
    report_interval: u64,
}

impl Default for RawAgents {
    fn default() -> Self {
        RawAgents {
            report_interval: report_interval(),
        }
    }
}

fn report_interval() -> u64 {
    10
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    certificate: PathBuf,
    private_key: PathBuf,
    client_ca: PathBuf,
    #[serde(default)]
    crls: Vec<PathBuf>,
    server_name: String,
    #[serde(default = "reload_interval")]
    reload_interval: u64,
}

fn reload_interval() -> u64 {
    10
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    #[serde(default = "connections_total")]
    connections_total: usize,
    #[serde(default = "connections_per_source")]
    connections_per_source: usize,
    #[serde(default = "handshake_timeout")]
    handshake_timeout: u64,
}

impl Default for RawLimits {
    fn default() -> Self {
        RawLimits {
            connections_total: connections_total(),
            connections_per_source: connections_per_source(),
            handshake_timeout: handshake_timeout(),
        }
    }
}

fn connections_total() -> usize {
    1024
}
fn connections_per_source() -> usize {
    16
}
fn handshake_timeout() -> u64 {
    10
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoles {
    #[serde(default)]
    front_end: Vec<String>,
    #[serde(default)]
    relay_agent: Vec<String>,
    #[serde(default)]
    operator: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCredentials {
    rest_secret: String,
    #[serde(default = "credential_lifetime")]
    lifetime: u64,
}

fn credential_lifetime() -> u64 {
    86_400
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTurn {
    host: String,
    #[serde(default = "turn_offer")]
    offer: Vec<TurnTransport>,
    #[serde(default = "udp_port")]
    udp_port: u16,
    #[serde(default = "tcp_port")]
    tcp_port: u16,
    #[serde(default = "tls_port")]
    tls_port: u16,
}

fn turn_offer() -> Vec<TurnTransport> {
    vec![TurnTransport::Udp, TurnTransport::Tcp, TurnTransport::Tls]
}
fn udp_port() -> u16 {
    3478
}
fn tcp_port() -> u16 {
    443
}
fn tls_port() -> u16 {
    5349
}

/// A transport a TURN URI offers.
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum TurnTransport {
    Udp,
    Tcp,
    Tls,
}

/// Limits on client connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnectionLimits {
    pub total: usize,
    pub per_source: usize,
    /// A peer that has not completed its TLS handshake by then is dropped, so half-open
    /// handshakes cannot hold connection slots.
    pub handshake_timeout: Duration,
}

/// How media credentials are minted.
#[derive(Clone)]
pub struct CredentialSettings {
    /// The TURN REST API shared secret (the relay agents' current `rest_secrets` entry).
    pub rest_secret: Vec<u8>,
    /// The lifetime of credentials when a front-end asks for none, and the most it may ask
    /// for.
    pub lifetime: Duration,
    /// The TURN URIs handed out with every credential, in order of preference.
    pub turn_uris: Vec<String>,
}

impl fmt::Debug for CredentialSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CredentialSettings")
            .field("rest_secret", &"[redacted]")
            .field("lifetime", &self.lifetime)
            .field("turn_uris", &self.turn_uris)
            .finish()
    }
}

/// The validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub listen: SocketAddr,
    /// The state database (created if missing).
    pub database: PathBuf,
    pub tls: TlsFiles,
    /// How often the TLS files are checked for changes.
    pub tls_reload_interval: Duration,
    pub limits: ConnectionLimits,
    pub roles: RoleMap,
    pub credentials: CredentialSettings,
    /// How often each agent reports (`[agents] report_interval`, seconds; default 10).
    pub report_interval: Duration,
}

impl Config {
    /// Reads and validates a file; relative paths are taken from its directory.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::parse(&text, base)
    }

    /// Parses and validates `text`; relative paths are taken from `base_dir`. The TLS files
    /// are only named here; [`crate::tls::TlsFiles::load`] reads and checks them.
    pub fn parse(text: &str, base_dir: &Path) -> Result<Self, ConfigError> {
        let raw: RawConfig = toml::from_str(text)?;
        raw.validate(base_dir)
    }
}

impl RawConfig {
    fn validate(self, base_dir: &Path) -> Result<Config, ConfigError> {
        let tls = self.tls.validate(base_dir)?;
        let tls_reload_interval = Duration::from_secs(self.tls.reload_interval);
        let limits = self.limits.validate()?;
        let roles = self.roles.validate()?;
        let credentials = validate_credentials(&self.credentials, &self.turn)?;
        if self.database.as_os_str().is_empty() {
            return Err(invalid(
                "database",
                "empty path; name the state file, e.g. \"/var/lib/rampart/control.redb\"",
            ));
        }
        if !(1..=3600).contains(&self.agents.report_interval) {
            return Err(invalid(
                "agents.report_interval",
                "must be 1 to 3600 seconds (how often each agent reports; default 10)",
            ));
        }
        Ok(Config {
            listen: self.listen,
            database: base_dir.join(&self.database),
            tls,
            tls_reload_interval,
            limits,
            roles,
            credentials,
            report_interval: Duration::from_secs(self.agents.report_interval),
        })
    }
}

impl RawTls {
    fn validate(&self, base_dir: &Path) -> Result<TlsFiles, ConfigError> {
        if self.reload_interval == 0 {
            return Err(invalid(
                "tls.reload_interval",
                "must be at least 1 second (how often certificate files are checked for changes)",
            ));
        }
        let server_name = rustls::pki_types::ServerName::try_from(self.server_name.as_str())
            .map_err(|_| {
                invalid(
                    "tls.server_name",
                    format!(
                        "{:?} is not a DNS name or IP address; set the name clients connect to, \
                         which the server certificate must carry",
                        self.server_name
                    ),
                )
            })?
            .to_owned();
        Ok(TlsFiles {
            certificate: base_dir.join(&self.certificate),
            private_key: base_dir.join(&self.private_key),
            client_ca: base_dir.join(&self.client_ca),
            crls: self.crls.iter().map(|crl| base_dir.join(crl)).collect(),
            server_name,
        })
    }
}

impl RawLimits {
    fn validate(&self) -> Result<ConnectionLimits, ConfigError> {
        if self.connections_total == 0 {
            return Err(invalid("limits.connections_total", "must be at least 1"));
        }
        if self.connections_per_source == 0 || self.connections_per_source > self.connections_total
        {
            return Err(invalid(
                "limits.connections_per_source",
                "must be at least 1 and at most limits.connections_total",
            ));
        }
        if self.handshake_timeout == 0 || self.handshake_timeout > 300 {
            return Err(invalid(
                "limits.handshake_timeout",
                "must be 1 to 300 seconds (default 10)",
            ));
        }
        Ok(ConnectionLimits {
            total: self.connections_total,
            per_source: self.connections_per_source,
            handshake_timeout: Duration::from_secs(self.handshake_timeout),
        })
    }
}

impl RawRoles {
    fn validate(&self) -> Result<RoleMap, ConfigError> {
        let list = |key: &str, role: Role, entries: &[String]| {
            AllowList::parse(entries)
                .map_err(|problem| invalid(format!("roles.{key}"), problem))
                .and_then(|list| {
                    if list.is_empty() {
                        Err(invalid(
                            format!("roles.{key}"),
                            format!(
                                "empty: no certificate could act as {role}; list the SANs of its \
                                 certificates, e.g. [\"dns:front-end-1.example.com\"] or \
                                 [\"uri:spiffe://example.com/front-end\"]"
                            ),
                        ))
                    } else {
                        Ok(list)
                    }
                })
        };
        Ok(RoleMap {
            front_end: list("front_end", Role::FrontEnd, &self.front_end)?,
            relay_agent: list("relay_agent", Role::RelayAgent, &self.relay_agent)?,
            operator: list("operator", Role::Operator, &self.operator)?,
        })
    }
}

fn validate_credentials(
    credentials: &RawCredentials,
    turn: &RawTurn,
) -> Result<CredentialSettings, ConfigError> {
    if credentials.rest_secret.len() < MIN_SECRET_LEN {
        return Err(invalid(
            "credentials.rest_secret",
            format!(
                "{} characters is too short; use at least {MIN_SECRET_LEN} random characters, \
                 the same as the relay agents' current auth.rest_secrets entry",
                credentials.rest_secret.len()
            ),
        ));
    }
    // Relay agents refuse credentials that expire further ahead than their
    // auth.rest_max_lifetime (default one day); a week is far beyond any session's need.
    if credentials.lifetime < 60 || credentials.lifetime > 7 * 86_400 {
        return Err(invalid(
            "credentials.lifetime",
            "must be 60 seconds to 7 days, and at most the agents' auth.rest_max_lifetime \
             (default 86400)",
        ));
    }
    Ok(CredentialSettings {
        rest_secret: credentials.rest_secret.as_bytes().to_vec(),
        lifetime: Duration::from_secs(credentials.lifetime),
        turn_uris: turn_uris(turn)?,
    })
}

/// RFC 7065 URIs for the offered transports. TURN over TLS is `turns:` with
/// `transport=tcp`: the URI scheme, not the transport parameter, says TLS.
fn turn_uris(turn: &RawTurn) -> Result<Vec<String>, ConfigError> {
    let host = turn.host.trim();
    let host_part = match host.parse::<IpAddr>() {
        Ok(IpAddr::V6(v6)) => format!("[{v6}]"),
        Ok(IpAddr::V4(v4)) => v4.to_string(),
        Err(_) => {
            if rustls::pki_types::DnsName::try_from(host).is_err() {
                return Err(invalid(
                    "turn.host",
                    format!(
                        "{host:?} is neither a DNS name nor an IP address; set the A/V edge's \
                         external name (e.g. \"av.example.com\")"
                    ),
                ));
            }
            host.to_ascii_lowercase()
        }
    };
    if turn.offer.is_empty() {
        return Err(invalid(
            "turn.offer",
            "empty: clients would get credentials without a server to use them on; \
             offer at least one of \"udp\", \"tcp\", \"tls\"",
        ));
    }
    let mut uris = Vec::new();
    for (index, transport) in turn.offer.iter().enumerate() {
        if turn.offer[..index].contains(transport) {
            return Err(invalid(
                "turn.offer",
                format!("{transport:?} is listed twice"),
            ));
        }
        let uri = match transport {
            TurnTransport::Udp => {
                port_ok("turn.udp_port", turn.udp_port)?;
                format!("turn:{host_part}:{}?transport=udp", turn.udp_port)
            }
            TurnTransport::Tcp => {
                port_ok("turn.tcp_port", turn.tcp_port)?;
                format!("turn:{host_part}:{}?transport=tcp", turn.tcp_port)
            }
            TurnTransport::Tls => {
                port_ok("turn.tls_port", turn.tls_port)?;
                if host.parse::<IpAddr>().is_ok() {
                    return Err(invalid(
                        "turn.host",
                        "TLS is offered but the host is an IP address: clients check the \
                         relay's certificate against a DNS name; set the name it carries",
                    ));
                }
                format!("turns:{host_part}:{}?transport=tcp", turn.tls_port)
            }
        };
        uris.push(uri);
    }
    if turn.offer.contains(&TurnTransport::Tcp)
        && turn.offer.contains(&TurnTransport::Tls)
        && turn.tcp_port == turn.tls_port
    {
        return Err(invalid(
            "turn.tls_port",
            format!(
                "TCP and TLS are both offered on port {}; one listener cannot be both, set \
                 different ports (TLS usually 5349) or offer only one",
                turn.tcp_port
            ),
        ));
    }
    Ok(uris)
}

fn port_ok(key: &str, port: u16) -> Result<(), ConfigError> {
    if port == 0 {
        Err(invalid(key, "port 0 is not a port clients can reach"))
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = r#"
        listen = "127.0.0.1:7443"
        database = "control.redb"
        [tls]
        certificate = "server.pem"
        private_key = "server.key"
        client_ca = "ca.pem"
        server_name = "control.example.com"
        [roles]
        front_end = ["dns:fe1.example.com"]
        relay_agent = ["dns:*.agents.example.com"]
        operator = ["uri:spiffe://example.com/operator"]
        [credentials]
        rest_secret = "0123456789abcdef0123"
        [turn]
        host = "av.example.com"
    "#;

    fn error_of(text: &str) -> String {
        Config::parse(text, Path::new("/etc/rampart"))
            .expect_err("should be refused")
            .to_string()
    }

    #[test]
    fn valid_config_gets_defaults_and_relative_paths() {
        let config = Config::parse(VALID, Path::new("/etc/rampart")).unwrap();
        assert_eq!(config.database, Path::new("/etc/rampart/control.redb"));
        assert_eq!(config.tls.certificate, Path::new("/etc/rampart/server.pem"));
        assert_eq!(config.limits.handshake_timeout, Duration::from_secs(10));
        assert_eq!(
            config.credentials.turn_uris,
            [
                "turn:av.example.com:3478?transport=udp",
                "turn:av.example.com:443?transport=tcp",
                "turns:av.example.com:5349?transport=tcp",
            ]
        );
        assert_eq!(config.credentials.lifetime, Duration::from_secs(86_400));
    }

    #[test]
    fn report_interval_defaults_to_ten_seconds_and_is_bounded() {
        let config = Config::parse(VALID, Path::new(".")).unwrap();
        assert_eq!(config.report_interval, Duration::from_secs(10));
        let every_second = format!("{VALID}\n[agents]\nreport_interval = 1\n");
        let config = Config::parse(&every_second, Path::new(".")).unwrap();
        assert_eq!(config.report_interval, Duration::from_secs(1));
        let never = format!("{VALID}\n[agents]\nreport_interval = 0\n");
        assert!(error_of(&never).contains("agents.report_interval"));
    }

    #[test]
    fn development_config_is_valid() {
        Config::parse(DEVELOPMENT, Path::new(".")).unwrap();
    }

    #[test]
    fn unknown_keys_are_refused() {
        let text = VALID.replace("[turn]", "[turn]\nhots = \"x\"");
        assert!(error_of(&text).contains("unknown field"));
    }

    #[test]
    fn short_secret_names_the_key() {
        let text = VALID.replace("0123456789abcdef0123", "short");
        assert!(error_of(&text).contains("credentials.rest_secret"));
    }

    #[test]
    fn empty_role_list_names_the_key() {
        let text = VALID.replace("[\"dns:fe1.example.com\"]", "[]");
        assert!(error_of(&text).contains("roles.front_end"));
    }

    #[test]
    fn bad_role_entry_names_the_key() {
        let text = VALID.replace("dns:fe1.example.com", "fe1.example.com");
        let error = error_of(&text);
        assert!(error.contains("roles.front_end"), "{error}");
        assert!(error.contains("dns:"), "{error}");
    }

    #[test]
    fn tls_with_ip_host_is_refused() {
        let text = VALID.replace("av.example.com", "192.0.2.1");
        assert!(error_of(&text).contains("turn.host"));
        let text = text.replace(
            "host = \"192.0.2.1\"",
            "host = \"2001:db8::1\"\noffer = [\"udp\"]",
        );
        let config = Config::parse(&text, Path::new(".")).unwrap();
        assert_eq!(
            config.credentials.turn_uris,
            ["turn:[2001:db8::1]:3478?transport=udp"]
        );
    }

    #[test]
    fn tcp_and_tls_on_one_port_is_refused() {
        let text = VALID.replace(
            "host = \"av.example.com\"",
            "host = \"av.example.com\"\ntls_port = 443",
        );
        assert!(error_of(&text).contains("turn.tls_port"));
    }

    #[test]
    fn bad_server_name_is_refused() {
        let text = VALID.replace("control.example.com", "not a name");
        assert!(error_of(&text).contains("tls.server_name"));
    }
}
