//! The agent's configuration: one TOML file, parsed with serde (unknown keys rejected) and
//! validated once into typed values. A bad value is refused at start-up with the key and the
//! fix, because a silently accepted misconfiguration breaks one feature while the others keep
//! working, which is the hardest kind of fault to trace at an edge.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;

use rampart_rate_limit::RateLimit;
use rampart_turn::auth::{Credentials, RestSecrets};
use rampart_turn::bandwidth::{BandwidthLimit, BandwidthPolicy};
use rampart_turn::peer_policy::PeerPolicy;
use rampart_turn::server::{Consent, ListenerSide};
use rampart_turn::{RelayAddress, ServerConfig, Transport};
pub use rampart_xdp::fast_path::{Mode as XdpMode, Settings as XdpSettings};

mod sip;
pub use sip::{PartnerTls, SipPeer, SipSettings};

/// The configuration `rampart` runs with when given no `--config`.
pub const EMBEDDED_DEFAULT: &str = include_str!("../config/default.toml");

/// REST API secrets shorter than this are guessable offline from one captured credential.
const MIN_SECRET_LEN: usize = 16;

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
    realm: String,
    software: Option<String>,
    #[serde(default)]
    listen: Vec<RawListener>,
    tls: Option<RawTls>,
    relay: RawRelay,
    #[serde(default)]
    auth: RawAuth,
    #[serde(default)]
    limits: RawLimits,
    xdp: Option<RawXdp>,
    control: Option<RawControl>,
    conferencing: Option<RawConferencing>,
    sip: Option<sip::RawSip>,
}

/// `[conferencing]`: the Web Conferencing Edge.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConferencing {
    #[serde(default = "conferencing_external")]
    external: SocketAddr,
    certificate: PathBuf,
    private_key: PathBuf,
    internal: SocketAddr,
    internal_certificate: PathBuf,
    internal_private_key: PathBuf,
    internal_client_ca: PathBuf,
    #[serde(default = "conferencing_pool")]
    pool: u16,
    #[serde(default = "conferencing_wait")]
    wait_for_server: u64,
    #[serde(default = "conferencing_join_timeout")]
    join_timeout: u64,
    #[serde(default = "conferencing_idle_timeout")]
    idle_timeout: u64,
    #[serde(default = "connections_per_source")]
    connections_per_source: usize,
    #[serde(default = "conferencing_connections_total")]
    connections_total: usize,
}

fn conferencing_external() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 443))
}
fn conferencing_pool() -> u16 {
    4
}
fn conferencing_wait() -> u64 {
    10
}
fn conferencing_join_timeout() -> u64 {
    10
}
fn conferencing_idle_timeout() -> u64 {
    600
}
fn conferencing_connections_total() -> usize {
    4096
}

/// The Web Conferencing Edge's listeners and limits (`[conferencing]`).
#[derive(Clone)]
pub struct ConferencingSettings {
    /// TLS for outside participants.
    pub external: SocketAddr,
    pub external_tls: Arc<rustls::ServerConfig>,
    /// Mutual TLS for internal conferencing servers (they dial in).
    pub internal: SocketAddr,
    pub internal_tls: Arc<rustls::ServerConfig>,
    /// Idle internal connections the edge asks the servers to keep.
    pub pool: u16,
    /// How long an admitted participant waits for an internal connection.
    pub wait_for_server: Duration,
    /// TLS handshake plus the join frame, on either leg.
    pub join_timeout: Duration,
    /// A relayed session with no bytes either way for this long ends.
    pub idle_timeout: Duration,
    pub connections_per_source: usize,
    pub connections_total: usize,
}

impl fmt::Debug for ConferencingSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConferencingSettings")
            .field("external", &self.external)
            .field("internal", &self.internal)
            .finish_non_exhaustive()
    }
}

/// `[control]`: the keys of a control client file, and the agent's identifier.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawControl {
    endpoint: String,
    server_name: Option<String>,
    ca: PathBuf,
    certificate: PathBuf,
    private_key: PathBuf,
    agent_id: String,
}

/// The link to the control service, when `[control]` is set: where it is, how to recognise
/// it and the agent's own client certificate, and the agent's identifier there.
#[derive(Clone, Debug)]
pub struct ControlSettings {
    pub link: control_link::client::Link,
    pub agent_id: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawXdp {
    #[serde(default = "xdp_mode")]
    mode: XdpMode,
    #[serde(default)]
    interfaces: Vec<String>,
    #[serde(default = "xdp_max_channels")]
    max_channels: u32,
    #[serde(default = "xdp_pin_path")]
    pin_path: PathBuf,
    #[serde(default = "xdp_cache_next_hops")]
    cache_next_hops: bool,
}

fn xdp_cache_next_hops() -> bool {
    true
}

fn xdp_pin_path() -> PathBuf {
    PathBuf::from("/sys/fs/bpf/rampart")
}

fn xdp_mode() -> XdpMode {
    XdpMode::Auto
}
fn xdp_max_channels() -> u32 {
    65_536
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListener {
    transport: RawTransport,
    address: SocketAddr,
    #[serde(default)]
    side: RawSide,
}

/// Which side of the edge a listener faces: allocations made on an internal one are internal
/// parties', whose consent external users need to reach internal networks.
#[derive(Debug, Deserialize, Clone, Copy, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum RawSide {
    #[default]
    External,
    Internal,
}

#[derive(Debug, Deserialize, Clone, Copy, Default)]
#[serde(rename_all = "lowercase")]
enum RawConsent {
    Off,
    #[default]
    Party,
    Authorized,
}

#[derive(Debug, Deserialize, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum RawTransport {
    Udp,
    Tcp,
    Tls,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    certificate: PathBuf,
    private_key: PathBuf,
    fqdn: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRelay {
    ipv4: Option<Ipv4Addr>,
    ipv6: Option<Ipv6Addr>,
    public_ipv4: Option<Ipv4Addr>,
    public_ipv6: Option<Ipv6Addr>,
    #[serde(default)]
    behind_nat: bool,
    #[serde(default = "default_port_min")]
    port_min: u16,
    #[serde(default = "default_port_max")]
    port_max: u16,
    #[serde(default = "default_lifetime")]
    default_lifetime: u64,
    #[serde(default = "max_lifetime")]
    max_lifetime: u64,
    #[serde(default)]
    allowed_peer_networks: Vec<IpNet>,
    #[serde(default)]
    denied_peer_networks: Vec<IpNet>,
    /// Relay loops (threads); default: the CPUs this process may use.
    loops: Option<usize>,
    /// Steer client datagrams to their owner loop in the kernel (a reuseport BPF program);
    /// when false, or when the program cannot be loaded, loops hand them over instead.
    #[serde(default = "enabled")]
    steering: bool,
    /// Gather each loop's peer datagrams on one receive socket per family (an `sk_lookup`
    /// BPF program); when false, or when the program cannot be loaded, each relay socket is
    /// read on its own.
    #[serde(default = "enabled")]
    gather_peers: bool,
    /// Whose agreement external users need to relay to the allowed (internal) networks.
    #[serde(default)]
    consent: RawConsent,
}

fn enabled() -> bool {
    true
}

fn default_port_min() -> u16 {
    50000
}
fn default_port_max() -> u16 {
    59999
}
fn default_lifetime() -> u64 {
    600
}
fn max_lifetime() -> u64 {
    3600
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawAuth {
    #[serde(default)]
    users: BTreeMap<String, String>,
    #[serde(default)]
    rest_secrets: Vec<String>,
    #[serde(default = "rest_max_lifetime")]
    rest_max_lifetime: u64,
    #[serde(default = "nonce_lifetime")]
    nonce_lifetime: u64,
}

fn rest_max_lifetime() -> u64 {
    86_400
}
fn nonce_lifetime() -> u64 {
    600
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    #[serde(default = "allocations_per_user")]
    allocations_per_user: usize,
    #[serde(default = "allocations_total")]
    allocations_total: usize,
    #[serde(default = "unauthenticated_per_second")]
    unauthenticated_per_second: f64,
    #[serde(default = "unauthenticated_burst")]
    unauthenticated_burst: f64,
    #[serde(default = "connections_total")]
    connections_total: usize,
    #[serde(default = "connections_per_source")]
    connections_per_source: usize,
    #[serde(default = "tls_handshake_timeout")]
    tls_handshake_timeout: u64,
    #[serde(default = "peer_connections_per_allocation")]
    peer_connections_per_allocation: usize,
    /// Each allocation's limit in each direction, bits per second of application data; 0 or
    /// absent: unlimited.
    #[serde(default)]
    bandwidth_per_allocation: u64,
    /// Its burst in bytes; default a tenth of a second at the limit, at least 1500.
    bandwidth_burst: Option<u64>,
    /// The agent's limit in each direction, all allocations together, bits per second of
    /// application data; 0 or absent: unlimited.
    #[serde(default)]
    bandwidth_total: u64,
    /// Its burst in bytes; default as for `bandwidth_burst`.
    bandwidth_total_burst: Option<u64>,
}

impl Default for RawLimits {
    fn default() -> Self {
        RawLimits {
            allocations_per_user: allocations_per_user(),
            allocations_total: allocations_total(),
            unauthenticated_per_second: unauthenticated_per_second(),
            unauthenticated_burst: unauthenticated_burst(),
            connections_total: connections_total(),
            connections_per_source: connections_per_source(),
            tls_handshake_timeout: tls_handshake_timeout(),
            peer_connections_per_allocation: peer_connections_per_allocation(),
            bandwidth_per_allocation: 0,
            bandwidth_burst: None,
            bandwidth_total: 0,
            bandwidth_total_burst: None,
        }
    }
}

fn allocations_per_user() -> usize {
    10
}
fn allocations_total() -> usize {
    10_000
}
fn unauthenticated_per_second() -> f64 {
    20.0
}
fn unauthenticated_burst() -> f64 {
    40.0
}
fn connections_total() -> usize {
    10_000
}
fn connections_per_source() -> usize {
    64
}
fn tls_handshake_timeout() -> u64 {
    10
}
/// A desktop-sharing session needs one; coturn's client in its TCP mode opens one per other
/// client (`-m` of them).
fn peer_connections_per_allocation() -> usize {
    32
}

/// A client listener.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Listener {
    pub transport: Transport,
    pub address: SocketAddr,
    /// On the internal side (`side = "internal"`).
    pub internal: bool,
}

/// Limits on client stream connections (TCP and TLS).
#[derive(Clone, Copy, Debug)]
pub struct ConnectionLimits {
    pub total: usize,
    pub per_source: usize,
    pub tls_handshake_timeout: Duration,
}

/// The validated configuration.
#[derive(Clone)]
pub struct Config {
    pub listeners: Vec<Listener>,
    pub tls: Option<Arc<rustls::ServerConfig>>,
    pub turn: ServerConfig,
    pub connections: ConnectionLimits,
    /// Static usernames, for the start-up summary (never their passwords).
    pub static_users: Vec<String>,
    /// The agent's total bandwidth limit, each direction (`[limits] bandwidth_total`).
    pub bandwidth_total: Option<BandwidthLimit>,
    /// Relay loops (threads), each owning a TURN core and its share of the sockets.
    pub relay_loops: usize,
    /// Whether client datagrams are steered to their loop in the kernel (`relay.steering`).
    pub steering: bool,
    /// Whether peer datagrams are gathered on one socket per loop (`relay.gather_peers`).
    pub gather_peers: bool,
    /// The XDP fast path; `None` when off.
    pub xdp: Option<XdpSettings>,
    /// The control-service link; `None` when the agent runs on its configuration alone.
    pub control: Option<ControlSettings>,
    /// The Web Conferencing Edge; `None` when off.
    pub conferencing: Option<ConferencingSettings>,
    /// The Access Edge (SIP); `None` when off.
    pub sip: Option<SipSettings>,
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("listeners", &self.listeners)
            .field("tls", &self.tls.is_some())
            .field("realm", &self.turn.realm)
            .finish_non_exhaustive()
    }
}

impl Config {
    /// Read and validate a file; relative certificate paths are taken from its directory.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::parse(&text, base)
    }

    pub fn embedded_default() -> Result<Self, ConfigError> {
        Self::parse(EMBEDDED_DEFAULT, Path::new("."))
    }

    pub fn parse(text: &str, base_dir: &Path) -> Result<Self, ConfigError> {
        let raw: RawConfig = toml::from_str(text)?;
        raw.validate(base_dir)
    }
}

impl RawConfig {
    fn validate(self, base_dir: &Path) -> Result<Config, ConfigError> {
        if self.realm.trim().is_empty() || self.realm.len() > 127 {
            return Err(invalid(
                "realm",
                "must be a non-empty string under 128 characters (e.g. your SIP domain)",
            ));
        }
        let listeners = validate_listeners(&self.listen)?;
        let bandwidth_per_allocation = bandwidth_limit(
            (
                "limits.bandwidth_per_allocation",
                self.limits.bandwidth_per_allocation,
            ),
            ("limits.bandwidth_burst", self.limits.bandwidth_burst),
        )?;
        let bandwidth_total = bandwidth_limit(
            ("limits.bandwidth_total", self.limits.bandwidth_total),
            (
                "limits.bandwidth_total_burst",
                self.limits.bandwidth_total_burst,
            ),
        )?;
        let listener_sides = listeners
            .iter()
            .map(|l| ListenerSide {
                transport: l.transport,
                address: l.address,
                internal: l.internal,
            })
            .collect();
        let wants_tls = listeners.iter().any(|l| l.transport == Transport::Tls);
        let tls = match (&self.tls, wants_tls) {
            (Some(tls), true) => Some(tls.load(base_dir)?),
            (None, true) => {
                return Err(invalid(
                    "tls",
                    "a `tls` listener is configured but there is no [tls] section with certificate, private_key and fqdn",
                ));
            }
            (Some(_), false) => {
                return Err(invalid(
                    "tls",
                    "[tls] is set but no listener has transport = \"tls\"; add one or remove [tls]",
                ));
            }
            (None, false) => None,
        };
        let relay = &self.relay;
        let relay_v4 = relay_address(
            "relay.ipv4",
            relay.ipv4.map(IpAddr::V4),
            relay.public_ipv4.map(IpAddr::V4),
            relay.behind_nat,
        )?;
        let relay_v6 = relay_address(
            "relay.ipv6",
            relay.ipv6.map(IpAddr::V6),
            relay.public_ipv6.map(IpAddr::V6),
            relay.behind_nat,
        )?;
        if relay_v4.is_none() && relay_v6.is_none() {
            return Err(invalid(
                "relay",
                "neither `ipv4` nor `ipv6` is set: the relay needs an address to allocate on",
            ));
        }
        if relay.port_min == 0 || relay.port_min > relay.port_max {
            return Err(invalid(
                "relay.port_min",
                format!(
                    "the relay port range {}-{} is empty; set port_min <= port_max (default 50000-59999)",
                    relay.port_min, relay.port_max
                ),
            ));
        }
        let max_loops = rampart_xdp::steering::MAX_LOOPS as usize;
        let relay_loops = match relay.loops {
            Some(loops) if (1..=max_loops).contains(&loops) => loops,
            Some(_) => {
                return Err(invalid(
                    "relay.loops",
                    format!("must be 1 to {max_loops}; leave it out for one per CPU"),
                ));
            }
            None => std::thread::available_parallelism()
                .map_or(1, usize::from)
                .min(max_loops),
        };
        if relay.default_lifetime == 0 || relay.default_lifetime > relay.max_lifetime {
            return Err(invalid(
                "relay.default_lifetime",
                "must be at least 1 s and at most relay.max_lifetime (RFC 8656 default: 600)",
            ));
        }
        let auth = &self.auth;
        for (user, password) in &auth.users {
            if user.is_empty() || user.contains(':') {
                return Err(invalid(
                    format!("auth.users.{user}"),
                    "static usernames must be non-empty and contain no ':' (that form is the REST API's)",
                ));
            }
            if password.is_empty() {
                return Err(invalid(format!("auth.users.{user}"), "empty password"));
            }
        }
        if auth.rest_secrets.len() > 2 {
            return Err(invalid(
                "auth.rest_secrets",
                "at most two secrets: the current one, and the previous one during a rotation",
            ));
        }
        if let Some(short) = auth.rest_secrets.iter().find(|s| s.len() < MIN_SECRET_LEN) {
            return Err(invalid(
                "auth.rest_secrets",
                format!(
                    "a secret of {} characters is too short; use at least {MIN_SECRET_LEN} random characters",
                    short.len()
                ),
            ));
        }
        if auth.users.is_empty() && auth.rest_secrets.is_empty() {
            return Err(invalid(
                "auth",
                "no static users and no rest_secrets: nobody could authenticate",
            ));
        }
        if auth.rest_max_lifetime == 0 || auth.nonce_lifetime == 0 {
            return Err(invalid(
                "auth",
                "rest_max_lifetime and nonce_lifetime must be positive numbers of seconds",
            ));
        }
        let limits = &self.limits;
        if limits.allocations_per_user == 0
            || limits.allocations_total == 0
            || limits.connections_total == 0
            || limits.connections_per_source == 0
            || limits.tls_handshake_timeout == 0
            || limits.peer_connections_per_allocation == 0
        {
            return Err(invalid("limits", "limits must be positive"));
        }
        if !(limits.unauthenticated_per_second > 0.0 && limits.unauthenticated_burst >= 1.0) {
            return Err(invalid(
                "limits.unauthenticated_per_second",
                "must be > 0, and unauthenticated_burst >= 1",
            ));
        }
        let own_addresses: Vec<IpAddr> = [relay_v4, relay_v6]
            .into_iter()
            .flatten()
            .flat_map(|r| [r.bind, r.advertised])
            .chain(listeners.iter().map(|l| l.address.ip()))
            .collect();
        let peer_policy = PeerPolicy::new(
            relay.allowed_peer_networks.clone(),
            relay.denied_peer_networks.clone(),
            own_addresses,
            listeners.iter().map(|l| l.address).collect(),
            Some((relay.port_min, relay.port_max)),
        );
        let rest = (!auth.rest_secrets.is_empty()).then(|| {
            RestSecrets::new(
                auth.rest_secrets
                    .iter()
                    .map(|s| s.as_bytes().to_vec())
                    .collect(),
                auth.rest_max_lifetime,
            )
        });
        let xdp = self
            .xdp
            .as_ref()
            .map(|xdp| xdp.validate(self.limits.bandwidth_total != 0))
            .transpose()?
            .flatten();
        let control = self
            .control
            .as_ref()
            .map(|c| c.validate(base_dir))
            .transpose()?;
        let conferencing = self
            .conferencing
            .as_ref()
            .map(|c| c.validate(base_dir))
            .transpose()?;
        if matches!(relay.consent, RawConsent::Authorized) && control.is_none() {
            return Err(invalid(
                "relay.consent",
                "\"authorized\" consent waits for front-ends' authorizations through the control plane: add a [control] section, or use \"party\"",
            ));
        }
        if conferencing.is_some() && control.is_none() {
            return Err(invalid(
                "conferencing",
                "the Web Conferencing Edge admits participants to conferences registered through the control plane: add a [control] section",
            ));
        }
        let sip = self
            .sip
            .as_ref()
            .map(|s| s.validate(base_dir))
            .transpose()?;
        let users: HashMap<String, String> = auth.users.clone().into_iter().collect();
        Ok(Config {
            listeners,
            tls,
            turn: ServerConfig {
                realm: self.realm.clone(),
                software: self.software.clone().filter(|s| !s.is_empty()),
                relay_v4,
                relay_v6,
                port_range: (relay.port_min, relay.port_max),
                default_lifetime: Duration::from_secs(relay.default_lifetime),
                max_lifetime: Duration::from_secs(relay.max_lifetime),
                nonce_lifetime: Duration::from_secs(auth.nonce_lifetime),
                allocations_per_user: limits.allocations_per_user,
                allocations_total: limits.allocations_total,
                unauthenticated_limit: RateLimit {
                    per_second: limits.unauthenticated_per_second,
                    burst: limits.unauthenticated_burst,
                },
                credentials: Credentials::new(users, rest),
                peer_policy,
                peer_connections_per_allocation: limits.peer_connections_per_allocation,
                bandwidth: BandwidthPolicy {
                    default: bandwidth_per_allocation,
                    users: Default::default(),
                },
                consent: match relay.consent {
                    RawConsent::Off => Consent::Off,
                    RawConsent::Party => Consent::Party,
                    RawConsent::Authorized => Consent::Authorized,
                },
                listener_sides,
            },
            connections: ConnectionLimits {
                total: limits.connections_total,
                per_source: limits.connections_per_source,
                tls_handshake_timeout: Duration::from_secs(limits.tls_handshake_timeout),
            },
            static_users: auth.users.keys().cloned().collect(),
            bandwidth_total,
            relay_loops,
            steering: relay.steering,
            gather_peers: relay.gather_peers,
            xdp,
            control,
            conferencing,
            sip,
        })
    }
}

/// A rate (bits per second, 0: none) and its burst (bytes, default a tenth of a second at the
/// rate), each with its key for the error.
fn bandwidth_limit(
    (rate_key, bits_per_second): (&str, u64),
    (burst_key, burst): (&str, Option<u64>),
) -> Result<Option<BandwidthLimit>, ConfigError> {
    match (bits_per_second, burst) {
        (0, Some(_)) => Err(invalid(
            burst_key,
            format!("a burst without {rate_key} (bits per second) limits nothing"),
        )),
        (0, None) => Ok(None),
        (bits_per_second, _) if bits_per_second < BandwidthLimit::MIN_BITS_PER_SECOND => {
            Err(invalid(
                rate_key,
                "must be at least 1000 bits per second (or 0, no limit): a slower limit passes nothing useful",
            ))
        }
        (_, Some(burst)) if burst < BandwidthLimit::MIN_BURST_BYTES => Err(invalid(
            burst_key,
            "must be at least 1500 bytes (one full datagram), or no datagram that size ever passes",
        )),
        (bits_per_second, None) => Ok(Some(BandwidthLimit::with_default_burst(bits_per_second))),
        (bits_per_second, Some(burst_bytes)) => Ok(Some(BandwidthLimit {
            bits_per_second,
            burst_bytes,
        })),
    }
}

impl RawXdp {
    /// `police_total`: whether a total bandwidth limit is configured, which the program then
    /// polices too.
    fn validate(&self, police_total: bool) -> Result<Option<XdpSettings>, ConfigError> {
        if self.mode == XdpMode::Off {
            return Ok(None);
        }
        if self.interfaces.is_empty() {
            return Err(invalid(
                "xdp.interfaces",
                "empty: name the interfaces relayed media crosses (e.g. [\"eth0\", \"eth1\"]), or set mode = \"off\"",
            ));
        }
        let mut seen = HashSet::new();
        for name in &self.interfaces {
            // IFNAMSIZ is 16 with the terminating NUL.
            if name.is_empty() || name.len() > 15 || name.contains(['/', ' ']) || !seen.insert(name)
            {
                return Err(invalid(
                    "xdp.interfaces",
                    format!("{name:?} is not a valid interface name, or is listed twice"),
                ));
            }
        }
        if self.max_channels == 0 {
            return Err(invalid(
                "xdp.max_channels",
                "must be positive (channels the kernel forwards at once; more are served in userspace)",
            ));
        }
        if !self.pin_path.is_absolute() {
            return Err(invalid(
                "xdp.pin_path",
                "must be an absolute path on bpffs (default /sys/fs/bpf/rampart)",
            ));
        }
        Ok(Some(XdpSettings {
            mode: self.mode,
            interfaces: self.interfaces.clone(),
            max_channels: self.max_channels,
            pin_path: self.pin_path.clone(),
            cache_next_hops: self.cache_next_hops,
            police_total,
        }))
    }
}

impl RawControl {
    fn validate(&self, base_dir: &Path) -> Result<ControlSettings, ConfigError> {
        if self.agent_id.is_empty()
            || self.agent_id.len() > 128
            || !self.agent_id.bytes().all(|b| b.is_ascii_graphic())
        {
            return Err(invalid(
                "control.agent_id",
                "must be 1 to 128 printable ASCII characters without spaces (e.g. the host name, \"edge-1\")",
            ));
        }
        let link = control_link::client::LinkFile {
            endpoint: self.endpoint.clone(),
            server_name: self.server_name.clone(),
            ca: self.ca.clone(),
            certificate: self.certificate.clone(),
            private_key: self.private_key.clone(),
        }
        .resolve(base_dir)
        .map_err(|e| invalid(format!("control.{}", e.key), e.problem))?;
        Ok(ControlSettings {
            link,
            agent_id: self.agent_id.clone(),
        })
    }
}

/// A certificate chain and its private key, from the PEM files of two keys.
#[allow(clippy::type_complexity)]
fn certificate_and_key(
    base_dir: &Path,
    (certificate_key, certificate): (&str, &Path),
    (private_key_key, private_key): (&str, &Path),
) -> Result<
    (
        Vec<rustls::pki_types::CertificateDer<'static>>,
        rustls::pki_types::PrivateKeyDer<'static>,
    ),
    ConfigError,
> {
    let certs = pem_certificates(
        certificate_key,
        &read_file(certificate_key, base_dir, certificate)?,
    )?;
    let key = pem_private_key(
        private_key_key,
        &read_file(private_key_key, base_dir, private_key)?,
    )?;
    Ok((certs, key))
}

/// The file at `path` (relative to the configuration's directory), named by its `key`.
fn read_file(key: &str, base_dir: &Path, path: &Path) -> Result<Vec<u8>, ConfigError> {
    let path = base_dir.join(path);
    std::fs::read(&path).map_err(|e| invalid(key, format!("cannot read {}: {e}", path.display())))
}

/// The PEM certificates in the file of `key`: at least one.
fn pem_certificates(
    key: &str,
    pem: &[u8],
) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, ConfigError> {
    let certs: Vec<_> = rustls_pemfile::certs(&mut &pem[..])
        .collect::<Result<_, _>>()
        .map_err(|e| invalid(key, format!("not PEM certificates: {e}")))?;
    if certs.is_empty() {
        return Err(invalid(key, "the file holds no PEM certificate"));
    }
    Ok(certs)
}

/// The PEM private key in the file of `key`.
fn pem_private_key(
    key: &str,
    pem: &[u8],
) -> Result<rustls::pki_types::PrivateKeyDer<'static>, ConfigError> {
    rustls_pemfile::private_key(&mut &pem[..])
        .map_err(|e| invalid(key, format!("not a PEM private key: {e}")))?
        .ok_or_else(|| invalid(key, "the file holds no PEM private key"))
}

fn validate_listeners(raw: &[RawListener]) -> Result<Vec<Listener>, ConfigError> {
    if raw.is_empty() {
        return Err(invalid(
            "listen",
            "no listener; add e.g. [[listen]] transport = \"udp\" address = \"0.0.0.0:3478\"",
        ));
    }
    let mut seen = HashSet::new();
    let mut listeners = Vec::new();
    for l in raw {
        let transport = match l.transport {
            RawTransport::Udp => Transport::Udp,
            RawTransport::Tcp => Transport::Tcp,
            RawTransport::Tls => Transport::Tls,
        };
        // TCP and TLS share the port space; UDP has its own.
        let socket_kind = transport == Transport::Udp;
        if !seen.insert((socket_kind, l.address)) {
            return Err(invalid(
                "listen",
                format!("{} is configured twice for the same socket type", l.address),
            ));
        }
        if l.address.port() == 0 {
            return Err(invalid(
                "listen.address",
                format!("{}: a listener needs a fixed port", l.address),
            ));
        }
        listeners.push(Listener {
            transport,
            address: l.address,
            internal: l.side == RawSide::Internal,
        });
    }
    Ok(listeners)
}

/// One relay family: the bind address and what clients are told.
fn relay_address(
    key: &str,
    bind: Option<IpAddr>,
    public: Option<IpAddr>,
    behind_nat: bool,
) -> Result<Option<RelayAddress>, ConfigError> {
    let Some(bind) = bind else {
        return Ok(None);
    };
    let public_key = key.replace("relay.", "relay.public_");
    if behind_nat {
        let Some(public) = public else {
            return Err(invalid(
                public_key,
                format!(
                    "behind_nat = true but no public address for {key} ({bind}); set the NAT's public address, or clients are told an address they cannot reach"
                ),
            ));
        };
        if PeerPolicy::new(vec![], vec![], vec![], vec![], None)
            .check(public)
            .is_err()
        {
            return Err(invalid(
                public_key,
                format!(
                    "{public} is not a public address; behind a 1:1 NAT the advertised address must be the NAT's public one"
                ),
            ));
        }
        return Ok(Some(RelayAddress {
            bind,
            advertised: public,
        }));
    }
    if public.is_some() {
        return Err(invalid(
            public_key,
            "a public address is set but behind_nat = false; set behind_nat = true to advertise it",
        ));
    }
    if bind.is_unspecified() {
        return Err(invalid(
            key,
            format!(
                "{bind} is not an address clients can be told; bind a concrete address (or set behind_nat with a public address)"
            ),
        ));
    }
    Ok(Some(RelayAddress {
        bind,
        advertised: bind,
    }))
}

impl RawConferencing {
    fn validate(&self, base_dir: &Path) -> Result<ConferencingSettings, ConfigError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let external_tls = {
            let (certs, key) = certificate_and_key(
                base_dir,
                ("conferencing.certificate", &self.certificate),
                ("conferencing.private_key", &self.private_key),
            )?;
            rustls::ServerConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()
                .map_err(|e| invalid("conferencing", e.to_string()))?
                .with_no_client_auth()
                .with_single_cert(certs, key)
                .map_err(|e| {
                    invalid(
                        "conferencing.private_key",
                        format!("does not fit conferencing.certificate: {e}"),
                    )
                })?
        };
        let internal_tls = {
            let (certs, key) = certificate_and_key(
                base_dir,
                (
                    "conferencing.internal_certificate",
                    &self.internal_certificate,
                ),
                (
                    "conferencing.internal_private_key",
                    &self.internal_private_key,
                ),
            )?;
            let mut roots = rustls::RootCertStore::empty();
            for cert in pem_certificates(
                "conferencing.internal_client_ca",
                &read_file(
                    "conferencing.internal_client_ca",
                    base_dir,
                    &self.internal_client_ca,
                )?,
            )? {
                roots.add(cert).map_err(|e| {
                    invalid(
                        "conferencing.internal_client_ca",
                        format!("unusable CA certificate: {e}"),
                    )
                })?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider.clone(),
            )
            .build()
            .map_err(|e| invalid("conferencing.internal_client_ca", e.to_string()))?;
            rustls::ServerConfig::builder_with_provider(provider)
                .with_protocol_versions(&[&rustls::version::TLS13])
                .map_err(|e| invalid("conferencing", e.to_string()))?
                .with_client_cert_verifier(verifier)
                .with_single_cert(certs, key)
                .map_err(|e| {
                    invalid(
                        "conferencing.internal_private_key",
                        format!("does not fit conferencing.internal_certificate: {e}"),
                    )
                })?
        };
        if self.external == self.internal {
            return Err(invalid(
                "conferencing.internal",
                "the internal port must differ from the external one (8057 by convention)",
            ));
        }
        if self.pool == 0 || self.wait_for_server == 0 || self.join_timeout == 0 {
            return Err(invalid(
                "conferencing",
                "pool, wait_for_server and join_timeout must be at least 1",
            ));
        }
        Ok(ConferencingSettings {
            external: self.external,
            external_tls: Arc::new(external_tls),
            internal: self.internal,
            internal_tls: Arc::new(internal_tls),
            pool: self.pool,
            wait_for_server: Duration::from_secs(self.wait_for_server),
            join_timeout: Duration::from_secs(self.join_timeout),
            idle_timeout: Duration::from_secs(self.idle_timeout.max(1)),
            connections_per_source: self.connections_per_source.max(1),
            connections_total: self.connections_total.max(1),
        })
    }
}

impl RawTls {
    fn load(&self, base_dir: &Path) -> Result<Arc<rustls::ServerConfig>, ConfigError> {
        use rustls::pki_types::ServerName;
        let (certs, key) = certificate_and_key(
            base_dir,
            ("tls.certificate", &self.certificate),
            ("tls.private_key", &self.private_key),
        )?;
        let leaf = &certs[0];
        if self.fqdn.trim().is_empty() {
            return Err(invalid(
                "tls.fqdn",
                "empty; set the name clients connect to (it must be in the certificate)",
            ));
        }
        let name = ServerName::try_from(self.fqdn.as_str())
            .map_err(|_| invalid("tls.fqdn", format!("{:?} is not a DNS name", self.fqdn)))?;
        let end_entity = webpki::EndEntityCert::try_from(leaf)
            .map_err(|e| invalid("tls.certificate", format!("unparsable certificate: {e}")))?;
        end_entity
            .verify_is_valid_for_subject_name(&name)
            .map_err(|_| {
                invalid(
                    "tls.fqdn",
                    format!(
                        "the certificate does not name {:?}; clients would refuse it. Use a certificate for this name or fix fqdn",
                        self.fqdn
                    ),
                )
            })?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| invalid("tls", e.to_string()))?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .map_err(|e| {
                invalid(
                    "tls.private_key",
                    format!("does not fit the certificate: {e}"),
                )
            })?;
        Ok(Arc::new(config))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) const MINIMAL: &str = r#"
realm = "example.org"
[[listen]]
transport = "udp"
address = "127.0.0.1:3478"
[relay]
ipv4 = "127.0.0.1"
[auth]
users = { alice = "pw" }
"#;

    fn error_of(text: &str) -> String {
        Config::parse(text, Path::new(".")).unwrap_err().to_string()
    }

    #[test]
    fn embedded_default_is_valid() {
        let config = Config::embedded_default().unwrap();
        assert_eq!(config.listeners.len(), 4);
        assert!(config.turn.software.is_none());
        assert_eq!(config.turn.port_range, (50000, 59999));
    }

    #[test]
    fn minimal_config_gets_rfc_defaults() {
        let config = Config::parse(MINIMAL, Path::new(".")).unwrap();
        assert_eq!(config.turn.default_lifetime, Duration::from_secs(600));
        assert_eq!(config.turn.relay_v6, None);
    }

    #[test]
    fn bandwidth_limits_get_a_burst_and_refuse_what_limits_nothing() {
        let limited = format!("{MINIMAL}[limits]\nbandwidth_per_allocation = 2000000\n");
        let config = Config::parse(&limited, Path::new(".")).unwrap();
        assert_eq!(
            config.turn.bandwidth.limit_for("anyone"),
            Some(BandwidthLimit {
                bits_per_second: 2_000_000,
                burst_bytes: 25_000
            })
        );
        assert_eq!(
            Config::parse(MINIMAL, Path::new("."))
                .unwrap()
                .turn
                .bandwidth
                .limit_for("anyone"),
            None
        );
        let e = error_of(&format!(
            "{MINIMAL}[limits]\nbandwidth_per_allocation = 999\n"
        ));
        assert!(e.contains("at least 1000 bits per second"), "{e}");
        let total = format!("{MINIMAL}[limits]\nbandwidth_total = 100000000\n");
        let config = Config::parse(&total, Path::new(".")).unwrap();
        assert_eq!(
            config.bandwidth_total,
            Some(BandwidthLimit {
                bits_per_second: 100_000_000,
                burst_bytes: 1_250_000
            })
        );
        let e = error_of(&format!(
            "{MINIMAL}[limits]\nbandwidth_total = 100\nbandwidth_total_burst = 2000\n"
        ));
        assert!(e.contains("`limits.bandwidth_total`"), "{e}");
        let e = error_of(&format!("{MINIMAL}[limits]\nbandwidth_burst = 9000\n"));
        assert!(e.contains("limits.bandwidth_burst"), "{e}");
        let e = error_of(&format!(
            "{MINIMAL}[limits]\nbandwidth_per_allocation = 64000\nbandwidth_burst = 100\n"
        ));
        assert!(e.contains("at least 1500"), "{e}");
    }

    #[test]
    fn unknown_keys_are_rejected_with_their_name() {
        let e = error_of(&MINIMAL.replace("[relay]", "[relay]\nport_minimum = 3"));
        assert!(e.contains("port_minimum"), "{e}");
    }

    #[test]
    fn bad_values_name_the_key_and_the_fix() {
        let cases = [
            (
                MINIMAL.replace(
                    "127.0.0.1\"\n[auth]",
                    "127.0.0.1\"\nport_min = 6000\nport_max = 5000\n[auth]",
                ),
                "relay.port_min",
            ),
            (
                MINIMAL.replace(
                    "ipv4 = \"127.0.0.1\"",
                    "ipv4 = \"127.0.0.1\"\nbehind_nat = true",
                ),
                "relay.public_ipv4",
            ),
            (
                MINIMAL.replace(
                    "ipv4 = \"127.0.0.1\"",
                    "ipv4 = \"10.0.0.5\"\nbehind_nat = true\npublic_ipv4 = \"10.0.0.6\"",
                ),
                "not a public address",
            ),
            (
                MINIMAL.replace("ipv4 = \"127.0.0.1\"", "ipv4 = \"0.0.0.0\""),
                "relay.ipv4",
            ),
            (MINIMAL.replace("ipv4 = \"127.0.0.1\"", ""), "neither"),
            (
                MINIMAL.replace("users = { alice = \"pw\" }", ""),
                "nobody could authenticate",
            ),
            (
                MINIMAL.replace("users = { alice = \"pw\" }", "rest_secrets = [\"short\"]"),
                "too short",
            ),
            (MINIMAL.replace("\"udp\"", "\"tls\""), "[tls]"),
            (
                MINIMAL.replace("\"127.0.0.1:3478\"", "\"127.0.0.1:99999\""),
                "address",
            ),
            (MINIMAL.replace("\"udp\"", "\"sctp\""), "sctp"),
            (
                MINIMAL.replace("realm = \"example.org\"", "realm = \"\""),
                "realm",
            ),
        ];
        for (text, needle) in cases {
            let e = error_of(&text);
            assert!(e.contains(needle), "expected {needle:?} in {e:?}");
        }
    }

    #[test]
    fn xdp_section_is_validated() {
        let with = |section: &str| format!("{MINIMAL}\n[xdp]\n{section}\n");
        let config =
            Config::parse(&with("interfaces = [\"eth0\", \"eth1\"]"), Path::new(".")).unwrap();
        let xdp = config.xdp.unwrap();
        assert_eq!(xdp.mode, XdpMode::Auto);
        assert_eq!(xdp.max_channels, 65_536);
        assert!(
            Config::parse(&with("mode = \"off\""), Path::new("."))
                .unwrap()
                .xdp
                .is_none()
        );
        assert!(
            Config::parse(MINIMAL, Path::new("."))
                .unwrap()
                .xdp
                .is_none()
        );
        assert!(error_of(&with("mode = \"native\"")).contains("xdp.interfaces"));
        assert!(error_of(&with("interfaces = [\"a/b\"]")).contains("xdp.interfaces"));
        assert!(error_of(&with("mode = \"turbo\"\ninterfaces = [\"lo\"]")).contains("turbo"));
    }

    #[test]
    fn nat_public_address_is_advertised() {
        let text = MINIMAL.replace(
            "ipv4 = \"127.0.0.1\"",
            "ipv4 = \"10.0.0.5\"\nbehind_nat = true\npublic_ipv4 = \"198.51.100.20\"",
        );
        // 198.51.100.0/24 is documentation space: refused as not public.
        assert!(error_of(&text).contains("not a public address"));
        let text = text.replace("198.51.100.20", "8.8.8.8");
        let config = Config::parse(&text, Path::new(".")).unwrap();
        let relay = config.turn.relay_v4.unwrap();
        assert_eq!(relay.advertised, "8.8.8.8".parse::<IpAddr>().unwrap());
        assert_eq!(relay.bind, "10.0.0.5".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn tls_certificate_must_exist_and_name_the_fqdn() {
        let dir = std::env::temp_dir().join(format!("rampart-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let cert = rcgen::generate_simple_self_signed(vec!["turn.example.org".into()]).unwrap();
        std::fs::write(dir.join("cert.pem"), cert.cert.pem()).unwrap();
        std::fs::write(dir.join("key.pem"), cert.key_pair.serialize_pem()).unwrap();
        let tls = |fqdn: &str, cert_file: &str| {
            format!(
                "{}\n[tls]\ncertificate = \"{cert_file}\"\nprivate_key = \"key.pem\"\nfqdn = \"{fqdn}\"\n",
                MINIMAL.replace("\"udp\"", "\"tls\"")
            )
        };
        assert!(Config::parse(&tls("turn.example.org", "cert.pem"), &dir).is_ok());
        let e = Config::parse(&tls("edge.example.org", "cert.pem"), &dir)
            .unwrap_err()
            .to_string();
        assert!(e.contains("tls.fqdn") && e.contains("does not name"), "{e}");
        let e = Config::parse(&tls("turn.example.org", "missing.pem"), &dir)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("tls.certificate") && e.contains("missing.pem"),
            "{e}"
        );
        let other = rcgen::generate_simple_self_signed(vec!["turn.example.org".into()]).unwrap();
        std::fs::write(dir.join("other.pem"), other.cert.pem()).unwrap();
        let e = Config::parse(&tls("turn.example.org", "other.pem"), &dir)
            .unwrap_err()
            .to_string();
        assert!(e.contains("tls.private_key"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn control_section_is_validated() {
        let dir =
            std::env::temp_dir().join(format!("rampart-config-control-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca = rcgen::generate_simple_self_signed(vec!["control.example.org".into()]).unwrap();
        let agent = rcgen::generate_simple_self_signed(vec!["edge-1.example.org".into()]).unwrap();
        std::fs::write(dir.join("ca.pem"), ca.cert.pem()).unwrap();
        std::fs::write(dir.join("agent.pem"), agent.cert.pem()).unwrap();
        std::fs::write(dir.join("agent.key"), agent.key_pair.serialize_pem()).unwrap();
        std::fs::write(dir.join("other.key"), ca.key_pair.serialize_pem()).unwrap();
        std::fs::write(dir.join("garbage.pem"), "not PEM").unwrap();
        let section = "endpoint = \"https://control.example.org:50051/\"\nca = \"ca.pem\"\ncertificate = \"agent.pem\"\nprivate_key = \"agent.key\"\nagent_id = \"edge-1\"\n";
        let with = |section: &str| format!("{MINIMAL}\n[control]\n{section}");
        let parse = |section: &str| Config::parse(&with(section), &dir);
        let error = |section: &str| parse(section).unwrap_err().to_string();

        let control = parse(section).unwrap().control.unwrap();
        assert_eq!(control.link.host, "control.example.org");
        assert_eq!(control.link.port, 50051);
        assert_eq!(control.agent_id, "edge-1");
        assert_eq!(
            control.link.server_name,
            rustls::pki_types::ServerName::try_from("control.example.org").unwrap()
        );
        assert!(Config::parse(MINIMAL, &dir).unwrap().control.is_none());
        // host:port without a scheme, with an explicit server name.
        let control = parse(
            &section
                .replace("https://control.example.org:50051/", "10.0.0.2:7000")
                .replace(
                    "agent_id",
                    "server_name = \"control.example.org\"\nagent_id",
                ),
        )
        .unwrap()
        .control
        .unwrap();
        assert_eq!(
            (control.link.host.as_str(), control.link.port),
            ("10.0.0.2", 7000)
        );
        assert_eq!(
            control.link.server_name,
            rustls::pki_types::ServerName::try_from("control.example.org").unwrap()
        );

        let cases = [
            (
                section.replace("https://", "http://"),
                "control.endpoint",
                "mutual TLS",
            ),
            (
                section.replace(":50051", ""),
                "control.endpoint",
                "host:port",
            ),
            (
                section.replace(":50051", ":0"),
                "control.endpoint",
                "host:port",
            ),
            (
                section.replace("\"ca.pem\"", "\"missing.pem\""),
                "control.ca",
                "missing.pem",
            ),
            (
                section.replace("\"ca.pem\"", "\"garbage.pem\""),
                "control.ca",
                "no PEM certificate",
            ),
            (
                section.replace("\"agent.pem\"", "\"garbage.pem\""),
                "control.certificate",
                "no PEM certificate",
            ),
            (
                section.replace("\"agent.key\"", "\"garbage.pem\""),
                "control.private_key",
                "no PEM private key",
            ),
            (
                section.replace("\"agent.key\"", "\"other.key\""),
                "control.private_key",
                "does not fit",
            ),
            (
                section.replace("\"edge-1\"", "\"edge 1\""),
                "control.agent_id",
                "printable",
            ),
            (
                section.replace("agent_id", "agent_name"),
                "agent_name",
                "unknown field",
            ),
        ];
        for (text, key, fix) in cases {
            let e = error(&text);
            assert!(e.contains(key) && e.contains(fix), "{key}/{fix}: {e}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
