//! The `rampart` binary as a child process: configuration written to a temporary directory,
//! output captured to a file, readiness probed on every listener, killed on drop.

use std::fmt::Write as _;
use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rampart_turn::stun::{Class, Message, MessageBuilder, Method, TransactionId};
use rustls::pki_types::CertificateDer;
use tempfile::TempDir;

use crate::certs::{self, SERVER_NAME, TestPki};
use crate::client::{Proto, TurnClient, loopback};
use crate::ports::{free_port, relay_range};
use crate::{PASSWORD, PEER_V6_NET, REALM, REST_SECRET, USER};

/// How long the server may take to answer on all its listeners.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(10);
/// Start attempts: a port picked free can be taken by someone else before the server binds it.
const START_ATTEMPTS: usize = 3;
/// Log lines printed when the server is dropped (the test runner shows them on failure).
const LOG_TAIL_LINES: usize = 300;

/// What a test wants from its server; turned into the TOML the binary reads.
#[derive(Clone, Debug)]
pub struct RampartConfig {
    pub realm: String,
    /// Transport and IP of each listener; ports are picked when the server starts.
    pub listeners: Vec<(Proto, IpAddr)>,
    /// Listeners (of `listeners`) on the edge's internal side (`side = "internal"`).
    pub internal_listeners: Vec<(Proto, IpAddr)>,
    pub relay_ipv4: Option<Ipv4Addr>,
    pub relay_ipv6: Option<Ipv6Addr>,
    /// CIDR strings; empty means the server's default peer policy.
    pub allowed_peer_networks: Vec<String>,
    pub users: Vec<(String, String)>,
    pub rest_secrets: Vec<String>,
    /// Extra `key = value` lines (values in TOML syntax) for `[relay]`.
    pub relay: Vec<(String, String)>,
    /// Extra `key = value` lines (values in TOML syntax) for `[limits]`.
    pub limits: Vec<(String, String)>,
    /// The `[xdp]` section; none by default (the server's default: no fast path).
    pub xdp: Option<XdpConfig>,
    /// `--stats-interval` (seconds between `counters` lines); the binary's default if unset.
    pub stats_interval: Option<u64>,
    /// Run the server inside this network namespace (`ip netns exec <name> rampart ...`); the
    /// listeners' free ports are picked and their readiness probed from inside it too.
    pub netns: Option<String>,
    /// The `[control]` section; none by default (no control-service link).
    pub control: Option<ControlLink>,
    /// Relay ports; by default a range of its own per test (see [`crate::ports`]).
    pub relay_ports: Option<(u16, u16)>,
    /// `--log`; by default info, and debug for rampart's own modules.
    pub log: Option<String>,
    /// The `[conferencing]` section; none by default.
    pub conferencing: Option<ConferencingConfig>,
    /// Further sections as TOML text (the Access Edge's `[sip]`, for one).
    pub sections: Vec<String>,
}

/// The `[conferencing]` section: the Web Conferencing Edge's listeners and PEM files
/// (absolute paths; one certificate for both legs, one CA for internal servers).
#[derive(Clone, Debug)]
pub struct ConferencingConfig {
    pub external: SocketAddr,
    pub internal: SocketAddr,
    pub certificate: PathBuf,
    pub private_key: PathBuf,
    pub internal_client_ca: PathBuf,
    pub wait_for_server: u64,
}

/// The `[control]` section of a configuration: the agent's link to `rampart-control`.
#[derive(Clone, Debug)]
pub struct ControlLink {
    /// `https://host:port` or `host:port`.
    pub endpoint: String,
    pub server_name: String,
    /// PEM files (absolute paths).
    pub ca: PathBuf,
    pub certificate: PathBuf,
    pub private_key: PathBuf,
    pub agent_id: String,
}

/// The `[xdp]` section of a configuration.
#[derive(Clone, Debug)]
pub struct XdpConfig {
    /// `off`, `auto`, `native` or `generic`.
    pub mode: String,
    pub interfaces: Vec<String>,
    /// `pin_path`: the bpffs directory the agent pins its maps and links under; the
    /// agent's default (/sys/fs/bpf/rampart) if unset. A server started with `in_netns` sees a
    /// /sys of its own (`ip netns exec` mounts a fresh one), so pins that must outlive it
    /// belong on a bpffs the test mounted elsewhere (see [`crate::bpf::BpfFs`]).
    pub pin_path: Option<PathBuf>,
    /// `max_channels`: the agent's default if unset.
    pub max_channels: Option<u32>,
    /// `cache_next_hops`: the agent's default (on) if unset.
    pub cache_next_hops: Option<bool>,
}

impl RampartConfig {
    /// Listeners as given, relays on 127.0.0.1 and ::1, the static user [`USER`], the REST
    /// secret [`REST_SECRET`], and the networks of test peers allowed (loopback, and
    /// [`PEER_V6_NET`]).
    pub fn loopback(listeners: &[(Proto, IpAddr)]) -> Self {
        RampartConfig {
            realm: REALM.to_owned(),
            listeners: listeners.to_vec(),
            internal_listeners: Vec::new(),
            relay_ipv4: Some(Ipv4Addr::LOCALHOST),
            relay_ipv6: Some(Ipv6Addr::LOCALHOST),
            allowed_peer_networks: vec![
                "127.0.0.0/8".to_owned(),
                "::1/128".to_owned(),
                PEER_V6_NET.to_owned(),
            ],
            users: vec![(USER.to_owned(), PASSWORD.to_owned())],
            rest_secrets: vec![REST_SECRET.to_owned()],
            // Test peers live on loopback, which is an allowed (internal) network here: they
            // are relayed to without an internal party's consent, which has tests of its own
            // (`with_consent`).
            relay: vec![("consent".to_owned(), quote("off"))],
            limits: Vec::new(),
            xdp: None,
            stats_interval: None,
            netns: None,
            control: None,
            relay_ports: None,
            log: None,
            conferencing: None,
            sections: Vec::new(),
        }
    }

    /// `[relay] consent` ("party" or "off", the tests' default).
    pub fn with_consent(mut self, consent: &str) -> Self {
        self.relay.retain(|(key, _)| key != "consent");
        self.relay.push(("consent".to_owned(), quote(consent)));
        self
    }

    /// One listener of `proto` on the loopback of a family.
    pub fn single(proto: Proto, v6: bool) -> Self {
        Self::loopback(&[(proto, loopback(v6))])
    }

    /// No allowed networks: the server's default peer policy, which refuses loopback,
    /// private, link-local and the other special-purpose ranges.
    pub fn with_default_peer_policy(mut self) -> Self {
        self.allowed_peer_networks.clear();
        self
    }

    pub fn with_relay_setting(mut self, key: &str, value: &str) -> Self {
        self.relay.push((key.to_owned(), value.to_owned()));
        self
    }

    pub fn with_limit(mut self, key: &str, value: &str) -> Self {
        self.limits.push((key.to_owned(), value.to_owned()));
        self
    }

    /// An `[xdp]` section: `mode` (`off`, `auto`, `native`, `generic`) on `interfaces`.
    pub fn with_xdp(mut self, mode: &str, interfaces: &[&str]) -> Self {
        self.xdp = Some(XdpConfig {
            mode: mode.to_owned(),
            interfaces: interfaces.iter().map(|i| (*i).to_owned()).collect(),
            pin_path: None,
            max_channels: None,
            cache_next_hops: None,
        });
        self
    }

    /// `[xdp] pin_path` (see [`XdpConfig::pin_path`]); call after [`RampartConfig::with_xdp`].
    pub fn with_xdp_pin_path(mut self, path: &Path) -> Self {
        self.xdp
            .as_mut()
            .expect("with_xdp_pin_path needs an [xdp] section: call with_xdp first")
            .pin_path = Some(path.to_owned());
        self
    }

    pub fn with_stats_interval(mut self, seconds: u64) -> Self {
        self.stats_interval = Some(seconds);
        self
    }

    /// A `[control]` section (see [`ControlLink`]).
    pub fn with_control(mut self, link: ControlLink) -> Self {
        self.control = Some(link);
        self
    }

    /// The Web Conferencing Edge (it needs `[control]` too).
    pub fn with_conferencing(mut self, conferencing: ConferencingConfig) -> Self {
        self.conferencing = Some(conferencing);
        self
    }

    /// Relay ports `min..=max` (a load test wants the whole unprivileged range).
    pub fn with_relay_ports(mut self, min: u16, max: u16) -> Self {
        self.relay_ports = Some((min, max));
        self
    }

    /// The log filter (`--log`), e.g. "info" for a load test, where debug lines would cost.
    pub fn with_log(mut self, filter: &str) -> Self {
        self.log = Some(filter.to_owned());
        self
    }

    /// Appends a section written as TOML text.
    pub fn with_section(mut self, toml: String) -> Self {
        self.sections.push(toml);
        self
    }

    /// Run the server in the network namespace `name` (see [`RampartConfig::netns`]).
    pub fn in_netns(mut self, name: &str) -> Self {
        self.netns = Some(name.to_owned());
        self
    }

    fn wants_tls(&self) -> bool {
        self.listeners.iter().any(|(p, _)| *p == Proto::Tls)
    }

    fn to_toml(
        &self,
        listeners: &[(Proto, SocketAddr)],
        relay: (u16, u16),
        tls: Option<(&Path, &Path)>,
    ) -> String {
        let mut t = String::new();
        let _ = writeln!(t, "realm = {}", quote(&self.realm));
        for (proto, addr) in listeners {
            let _ = writeln!(
                t,
                "\n[[listen]]\ntransport = {}\naddress = {}",
                quote(proto.config_name()),
                quote(&addr.to_string())
            );
            if self.internal_listeners.contains(&(*proto, addr.ip())) {
                let _ = writeln!(t, "side = \"internal\"");
            }
        }
        if let Some((cert, key)) = tls {
            let _ = writeln!(
                t,
                "\n[tls]\ncertificate = {}\nprivate_key = {}\nfqdn = {}",
                quote(&cert.display().to_string()),
                quote(&key.display().to_string()),
                quote(SERVER_NAME)
            );
        }
        let _ = writeln!(t, "\n[relay]");
        if let Some(ip) = self.relay_ipv4 {
            let _ = writeln!(t, "ipv4 = {}", quote(&ip.to_string()));
        }
        if let Some(ip) = self.relay_ipv6 {
            let _ = writeln!(t, "ipv6 = {}", quote(&ip.to_string()));
        }
        let _ = writeln!(t, "port_min = {}\nport_max = {}", relay.0, relay.1);
        let nets: Vec<String> = self
            .allowed_peer_networks
            .iter()
            .map(|n| quote(n))
            .collect();
        let _ = writeln!(t, "allowed_peer_networks = [{}]", nets.join(", "));
        for (key, value) in &self.relay {
            let _ = writeln!(t, "{key} = {value}");
        }
        let _ = writeln!(t, "\n[auth]");
        let users: Vec<String> = self
            .users
            .iter()
            .map(|(u, p)| format!("{} = {}", quote(u), quote(p)))
            .collect();
        let _ = writeln!(t, "users = {{ {} }}", users.join(", "));
        let secrets: Vec<String> = self.rest_secrets.iter().map(|s| quote(s)).collect();
        let _ = writeln!(t, "rest_secrets = [{}]", secrets.join(", "));
        if !self.limits.is_empty() {
            let _ = writeln!(t, "\n[limits]");
            for (key, value) in &self.limits {
                let _ = writeln!(t, "{key} = {value}");
            }
        }
        if let Some(xdp) = &self.xdp {
            let interfaces: Vec<String> = xdp.interfaces.iter().map(|i| quote(i)).collect();
            let _ = writeln!(
                t,
                "\n[xdp]\nmode = {}\ninterfaces = [{}]",
                quote(&xdp.mode),
                interfaces.join(", ")
            );
            if let Some(max) = xdp.max_channels {
                let _ = writeln!(t, "max_channels = {max}");
            }
            if let Some(cache) = xdp.cache_next_hops {
                let _ = writeln!(t, "cache_next_hops = {cache}");
            }
            if let Some(path) = &xdp.pin_path {
                let _ = writeln!(t, "pin_path = {}", quote(&path.display().to_string()));
            }
        }
        if let Some(c) = &self.conferencing {
            let path = |p: &Path| quote(&p.display().to_string());
            let _ = writeln!(
                t,
                "\n[conferencing]\nexternal = {}\ninternal = {}\ncertificate = {}\nprivate_key = {}\ninternal_certificate = {}\ninternal_private_key = {}\ninternal_client_ca = {}\nwait_for_server = {}",
                quote(&c.external.to_string()),
                quote(&c.internal.to_string()),
                path(&c.certificate),
                path(&c.private_key),
                path(&c.certificate),
                path(&c.private_key),
                path(&c.internal_client_ca),
                c.wait_for_server,
            );
        }
        if let Some(control) = &self.control {
            let path = |p: &Path| quote(&p.display().to_string());
            let _ = writeln!(
                t,
                "\n[control]\nendpoint = {}\nserver_name = {}\nca = {}\ncertificate = {}\nprivate_key = {}\nagent_id = {}",
                quote(&control.endpoint),
                quote(&control.server_name),
                path(&control.ca),
                path(&control.certificate),
                path(&control.private_key),
                quote(&control.agent_id)
            );
        }
        for section in &self.sections {
            t.push_str(section);
        }
        t
    }
}

/// A TOML basic string.
fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04X}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The `rampart` binary next to the test executable: test executables live in
/// `<target>/<profile>/deps/`, the binary in `<target>/<profile>/`. `RAMPART_BIN` overrides.
pub fn binary() -> PathBuf {
    if let Some(path) = std::env::var_os("RAMPART_BIN") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("the test executable's path");
    let profile_dir = exe
        .parent()
        .and_then(|deps| {
            if deps.file_name().is_some_and(|n| n == "deps") {
                deps.parent()
            } else {
                Some(deps)
            }
        })
        .expect("the test executable sits in a target directory");
    let binary = profile_dir.join("rampart");
    assert!(
        binary.is_file(),
        "the rampart binary is missing at {}: build it first with `cargo build -p relay-user` \
         (`cargo test --workspace` builds it; `cargo test -p rampart-tests` alone does not), \
         or point RAMPART_BIN at it",
        binary.display()
    );
    // `cargo test -p rampart-tests` rebuilds the library the tests link, not the binary: a
    // binary older than this executable may predate the server code under test. Only a hint
    // (shown with a failure): changing just a test also makes the executable newer.
    let modified = |p: &Path| p.metadata().and_then(|m| m.modified()).ok();
    if let (Some(bin), Some(test)) = (modified(&binary), modified(&exe))
        && bin < test
    {
        eprintln!(
            "note: {} is older than this test executable; if the server changed, rebuild it \
             with `cargo build -p relay-user`",
            binary.display()
        );
    }
    binary
}

/// A running `rampart`.
pub struct Rampart {
    child: Child,
    dir: TempDir,
    log_path: PathBuf,
    config_path: PathBuf,
    listeners: Vec<(Proto, SocketAddr)>,
    relay_range: (u16, u16),
    pki: Option<TestPki>,
    /// Set by [`Rampart::sigkill`]: the exit was the test's doing.
    killed: bool,
}

impl Rampart {
    /// Starts the binary and waits until every listener answers (UDP: a STUN Binding;
    /// TCP/TLS: a TCP connect), for at most 10 s per attempt.
    pub fn start(config: &RampartConfig) -> anyhow::Result<Rampart> {
        let binary = binary();
        let mut failures = String::new();
        for attempt in 1..=START_ATTEMPTS {
            match Self::try_start(&binary, config) {
                Ok(server) => return Ok(server),
                // Only a lost race for a port is worth another attempt.
                Err((e, log)) if log.contains("in use") && attempt < START_ATTEMPTS => {
                    let _ = writeln!(failures, "attempt {attempt}: {e:#}");
                }
                Err((e, log)) => {
                    bail!("{failures}{e:#}\n----- rampart output -----\n{log}\n-----");
                }
            }
        }
        unreachable!("the last attempt returns")
    }

    fn try_start(
        binary: &Path,
        config: &RampartConfig,
    ) -> Result<Rampart, (anyhow::Error, String)> {
        let dir = tempfile::Builder::new()
            .prefix("rampart-test-")
            .tempdir()
            .map_err(|e| (e.into(), String::new()))?;
        let log_path = dir.path().join("rampart.log");
        // Free ports are looked for where the server will bind them.
        let prepared = match &config.netns {
            Some(ns) => crate::netns::run_in(ns, || Self::prepare(dir.path(), config)),
            None => Self::prepare(dir.path(), config),
        };
        let (config_path, listeners, relay_range, pki) =
            prepared.map_err(|e| (e, String::new()))?;
        let spawned = (|| -> anyhow::Result<Child> {
            let log = File::create(&log_path)?;
            // `ip netns exec` execs the binary in place (same process), so killing the child
            // kills the server, and the parent-death signal set below survives the exec.
            let mut command = match &config.netns {
                Some(ns) => {
                    let mut c = Command::new("ip");
                    c.args(["netns", "exec", ns]).arg(binary);
                    c
                }
                None => Command::new(binary),
            };
            if let Some(seconds) = config.stats_interval {
                command.arg("--stats-interval").arg(seconds.to_string());
            }
            let child = crate::tools::die_with_parent(&mut command)
                .arg("--config")
                .arg(&config_path)
                .env_remove("RUST_LOG")
                .arg("--log")
                .arg(config.log.as_deref().unwrap_or("info,rampart=debug"))
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .with_context(|| format!("spawning {}", binary.display()))?;
            Ok(child)
        })();
        let child = spawned.map_err(|e| (e, String::new()))?;
        let mut server = Rampart {
            child,
            dir,
            log_path,
            config_path,
            listeners,
            relay_range,
            pki,
            killed: false,
        };
        let ready = match &config.netns {
            Some(ns) => crate::netns::run_in(ns, || server.wait_ready()),
            None => server.wait_ready(),
        };
        match ready {
            Ok(()) => Ok(server),
            Err(e) => {
                let _ = server.child.kill();
                let _ = server.child.wait();
                let log = server.log();
                let config = std::fs::read_to_string(&server.config_path).unwrap_or_default();
                Err((
                    e.context(format!(
                        "rampart did not come up; its configuration:\n{config}"
                    )),
                    log,
                ))
            }
        }
    }

    #[allow(clippy::type_complexity)]
    fn prepare(
        dir: &Path,
        config: &RampartConfig,
    ) -> anyhow::Result<(
        PathBuf,
        Vec<(Proto, SocketAddr)>,
        (u16, u16),
        Option<TestPki>,
    )> {
        let mut listeners = Vec::new();
        for (proto, ip) in &config.listeners {
            listeners.push((*proto, SocketAddr::new(*ip, free_port(*proto, *ip)?)));
        }
        let relay = config.relay_ports.unwrap_or_else(relay_range);
        let pki = config.wants_tls().then(certs::localhost).transpose()?;
        let tls_paths = match &pki {
            Some(pki) => {
                let cert = dir.join("cert.pem");
                let key = dir.join("key.pem");
                std::fs::write(&cert, &pki.cert_pem)?;
                std::fs::write(&key, &pki.key_pem)?;
                std::fs::write(dir.join("ca.pem"), &pki.ca_pem)?;
                Some((cert, key))
            }
            None => None,
        };
        let toml = config.to_toml(
            &listeners,
            relay,
            tls_paths.as_ref().map(|(c, k)| (c.as_path(), k.as_path())),
        );
        let config_path = dir.join("rampart.toml");
        std::fs::write(&config_path, toml)?;
        Ok((config_path, listeners, relay, pki))
    }

    fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        for (proto, addr) in self.listeners.clone() {
            loop {
                if let Some(status) = self.child.try_wait()? {
                    bail!("rampart exited with {status} before {proto:?} {addr} answered");
                }
                if Instant::now() >= deadline {
                    bail!("{proto:?} {addr} did not answer within {STARTUP_TIMEOUT:?}");
                }
                let up = match proto {
                    Proto::Udp => udp_binding_probe(addr),
                    Proto::Tcp | Proto::Tls => {
                        TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
                    }
                };
                if up {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(())
    }

    /// The listener of `proto` on `ip`.
    pub fn addr(&self, proto: Proto, ip: IpAddr) -> SocketAddr {
        self.listeners
            .iter()
            .find(|(p, a)| *p == proto && a.ip() == ip)
            .map(|(_, a)| *a)
            .unwrap_or_else(|| panic!("no {proto:?} listener on {ip} in this test's server"))
    }

    /// The listener of `proto` on the loopback of a family.
    pub fn loopback_addr(&self, proto: Proto, v6: bool) -> SocketAddr {
        self.addr(proto, loopback(v6))
    }

    pub fn listeners(&self) -> &[(Proto, SocketAddr)] {
        &self.listeners
    }

    /// The CA that signed the TLS listeners' certificate.
    pub fn ca(&self) -> Option<&CertificateDer<'static>> {
        self.pki.as_ref().map(|p| &p.ca_der)
    }

    /// The CA as a PEM file (for external TLS clients).
    pub fn ca_pem_path(&self) -> Option<PathBuf> {
        self.pki.as_ref().map(|_| self.dir.path().join("ca.pem"))
    }

    /// The server's temporary directory (scripts and files of a test can go there too).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn relay_range(&self) -> (u16, u16) {
        self.relay_range
    }

    /// A client connected to the listener of `proto` on the loopback of a family.
    pub fn client(&self, proto: Proto, v6: bool) -> anyhow::Result<TurnClient> {
        TurnClient::connect(proto, self.loopback_addr(proto, v6), self.ca())
    }

    /// Everything the server wrote so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_else(|e| format!("(no log: {e})"))
    }

    /// True while the process runs.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The server's process id. With `in_netns` it is the server's own: `ip netns exec`
    /// execs the binary in place.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills the server with SIGKILL, as a crash or the OOM killer would (no handler runs,
    /// nothing is cleaned up), and reaps it. Returns how it ended. The log stays readable.
    pub fn sigkill(&mut self) -> std::io::Result<std::process::ExitStatus> {
        self.killed = true;
        // `Child::kill` is SIGKILL on Unix.
        self.child.kill()?;
        self.child.wait()
    }

    /// Every `counters` line logged so far (`--stats-interval`), oldest first, as JSON.
    pub fn counters(&self) -> Vec<serde_json::Value> {
        self.log()
            .lines()
            .filter_map(|line| {
                let json = &line[line.find("counters {")? + "counters ".len()..];
                // Anything after the object (colour codes) is not part of it.
                serde_json::from_str(&json[..=json.rfind('}')?]).ok()
            })
            .collect()
    }
}

impl Drop for Rampart {
    fn drop(&mut self) {
        let exited_early = self
            .child
            .try_wait()
            .ok()
            .flatten()
            .filter(|_| !self.killed);
        let _ = self.child.kill();
        let _ = self.child.wait();
        if exited_early.is_none() && !self.killed && !std::thread::panicking() {
            return;
        }
        // The test runner captures this and shows it only when the test fails.
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        let skip = lines.len().saturating_sub(LOG_TAIL_LINES);
        let mut out = String::new();
        if let Some(status) = exited_early {
            let _ = writeln!(out, "rampart had exited on its own: {status}");
        }
        if self.killed {
            let _ = writeln!(out, "rampart was killed by the test (SIGKILL)");
        }
        let _ = writeln!(
            out,
            "----- rampart log ({}, last {} of {} lines) -----",
            self.log_path.display(),
            lines.len() - skip,
            lines.len()
        );
        for line in &lines[skip..] {
            let _ = writeln!(out, "{line}");
        }
        out.push_str("----- end of rampart log -----");
        eprintln!("{out}");
    }
}

/// One Binding over UDP; true when a success response with our transaction id comes back
/// within 200 ms.
fn udp_binding_probe(server: SocketAddr) -> bool {
    let probe = || -> anyhow::Result<bool> {
        let socket = UdpSocket::bind(SocketAddr::new(loopback(server.is_ipv6()), 0))?;
        socket.connect(server)?;
        socket.set_read_timeout(Some(Duration::from_millis(200)))?;
        let id = TransactionId(*b"rampart-prob");
        let request = MessageBuilder::new(Class::Request, Method::BINDING, id).finish();
        socket.send(&request)?;
        let mut buf = [0u8; 1500];
        let n = socket.recv(&mut buf)?;
        Ok(Message::parse(&buf[..n])
            .is_ok_and(|m| m.class == Class::SuccessResponse && m.transaction_id == id))
    };
    probe().unwrap_or(false)
}
