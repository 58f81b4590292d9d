//! The `rampart-control` binary as a child process, a throw-away PKI for its mutual TLS
//! (CA, server, front-end and agent certificates made with rcgen), and a front-end client.

use std::fmt::Write as _;
use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use proto::control::v1::front_end_client::FrontEndClient;
use proto::control::v1::operator_client::OperatorClient;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};
use tempfile::TempDir;
use tonic::transport::Channel;

use crate::REST_SECRET;
use crate::process::ControlLink;

/// The control service's certificate name.
pub const CONTROL_NAME: &str = "control.rampart.test";
pub const FRONT_END_NAME: &str = "front-end.rampart.test";
pub const AGENT_ID: &str = "edge-1";
const AGENT_NAME: &str = "edge-1.agents.rampart.test";
const OPERATOR_URI: &str = "spiffe://rampart.test/operator";
/// How long the service may take to accept connections.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(10);

/// A CA with server, front-end and agent certificates, written as PEM files to a directory.
pub struct ControlPki {
    pub dir: PathBuf,
}

impl ControlPki {
    /// Writes `ca.pem`, and `.pem`/`.key` of `server`, `front-end`, `agent` and `operator`,
    /// and of the Web Conferencing Edge (`conferencing-edge`) and an internal conferencing
    /// server (`conference-server`).
    pub fn create(dir: &Path) -> anyhow::Result<ControlPki> {
        let ca_key = KeyPair::generate()?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "Rampart control test CA");
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = ca_params.self_signed(&ca_key)?;
        std::fs::write(dir.join("ca.pem"), ca.pem())?;
        let leaves: [(&str, Vec<SanType>, bool); 6] = [
            (
                // The Web Conferencing Edge, both legs (outside: `localhost`; inside: its
                // internal name).
                "conferencing-edge",
                vec![
                    SanType::DnsName(crate::certs::SERVER_NAME.try_into()?),
                    SanType::DnsName(crate::conferencing::EDGE_INTERNAL_NAME.try_into()?),
                    SanType::IpAddress(Ipv4Addr::LOCALHOST.into()),
                ],
                true,
            ),
            (
                "conference-server",
                vec![SanType::DnsName(
                    crate::conferencing::CONFERENCE_SERVER_NAME.try_into()?,
                )],
                false,
            ),
            (
                "server",
                vec![
                    SanType::DnsName(CONTROL_NAME.try_into()?),
                    SanType::IpAddress(Ipv4Addr::LOCALHOST.into()),
                ],
                true,
            ),
            (
                "front-end",
                vec![SanType::DnsName(FRONT_END_NAME.try_into()?)],
                false,
            ),
            (
                "agent",
                vec![SanType::DnsName(AGENT_NAME.try_into()?)],
                false,
            ),
            (
                "operator",
                vec![SanType::URI(OPERATOR_URI.try_into()?)],
                false,
            ),
        ];
        for (stem, sans, server) in leaves {
            let key = KeyPair::generate()?;
            let mut params = CertificateParams::default();
            params.distinguished_name.push(DnType::CommonName, stem);
            params.subject_alt_names = sans;
            params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            params.extended_key_usages = vec![if server {
                ExtendedKeyUsagePurpose::ServerAuth
            } else {
                ExtendedKeyUsagePurpose::ClientAuth
            }];
            let cert = params.signed_by(&key, &ca, &ca_key)?;
            std::fs::write(dir.join(format!("{stem}.pem")), cert.pem())?;
            std::fs::write(dir.join(format!("{stem}.key")), key.serialize_pem())?;
        }
        Ok(ControlPki {
            dir: dir.to_owned(),
        })
    }

    /// The agent's `[control]` section for a service at `address`.
    pub fn agent_link(&self, address: SocketAddr) -> ControlLink {
        ControlLink {
            endpoint: format!("https://{address}"),
            server_name: CONTROL_NAME.to_owned(),
            ca: self.dir.join("ca.pem"),
            certificate: self.dir.join("agent.pem"),
            private_key: self.dir.join("agent.key"),
            agent_id: AGENT_ID.to_owned(),
        }
    }

    /// A front-end client over mutual TLS with the front-end certificate.
    pub async fn front_end(&self, address: SocketAddr) -> anyhow::Result<FrontEndClient<Channel>> {
        Ok(FrontEndClient::new(
            self.channel(address, "front-end").await?,
        ))
    }

    /// An operator client over mutual TLS with the operator certificate.
    pub async fn operator(&self, address: SocketAddr) -> anyhow::Result<OperatorClient<Channel>> {
        Ok(OperatorClient::new(
            self.channel(address, "operator").await?,
        ))
    }

    async fn channel(&self, address: SocketAddr, stem: &str) -> anyhow::Result<Channel> {
        let link = control::client::LinkFile {
            endpoint: address.to_string(),
            server_name: Some(CONTROL_NAME.to_owned()),
            ca: "ca.pem".into(),
            certificate: format!("{stem}.pem").into(),
            private_key: format!("{stem}.key").into(),
        }
        .resolve(&self.dir)?;
        Ok(link.connect().await?)
    }
}

/// `rampart-control` next to the test executable (`<target>/<profile>/`), like
/// [`crate::process::binary`]; `RAMPART_CONTROL_BIN` overrides.
pub fn binary() -> PathBuf {
    if let Some(path) = std::env::var_os("RAMPART_CONTROL_BIN") {
        return PathBuf::from(path);
    }
    let rampart = crate::process::binary();
    let binary = rampart.with_file_name("rampart-control");
    assert!(
        binary.is_file(),
        "the rampart-control binary is missing at {}: build it with `cargo build -p control` \
         (`cargo test --workspace` builds it), or point RAMPART_CONTROL_BIN at it",
        binary.display()
    );
    binary
}

/// A running `rampart-control`, killed on drop (its log printed then).
pub struct ControlService {
    child: Child,
    /// Holds the database, so a restart in the same directory keeps the state.
    dir: PathBuf,
    log_path: PathBuf,
    pub address: SocketAddr,
}

impl ControlService {
    /// Starts the service on `address` with its state in `state_dir` (created if missing;
    /// reused by a restart) and waits until it accepts connections.
    pub fn start(
        pki: &ControlPki,
        state_dir: &Path,
        address: SocketAddr,
    ) -> anyhow::Result<ControlService> {
        Self::start_in(pki, state_dir, address, None)
    }

    /// [`ControlService::start`] inside the network namespace `netns` (`ip netns exec`).
    pub fn start_in(
        pki: &ControlPki,
        state_dir: &Path,
        address: SocketAddr,
        netns: Option<&str>,
    ) -> anyhow::Result<ControlService> {
        Self::start_reporting(pki, state_dir, address, netns, None)
    }

    /// [`ControlService::start_in`], telling agents to report every `report_interval`
    /// seconds (the service's default when None).
    pub fn start_reporting(
        pki: &ControlPki,
        state_dir: &Path,
        address: SocketAddr,
        netns: Option<&str>,
        report_interval: Option<u64>,
    ) -> anyhow::Result<ControlService> {
        std::fs::create_dir_all(state_dir)?;
        let config_path = state_dir.join("control.toml");
        let pem = |name: &str| {
            let path = pki.dir.join(name);
            format!("{:?}", path.display().to_string())
        };
        let mut config = String::new();
        let _ = writeln!(
            config,
            "listen = \"{address}\"\ndatabase = \"control.redb\"\n\n[tls]\ncertificate = {}\nprivate_key = {}\nclient_ca = {}\nserver_name = \"{CONTROL_NAME}\"\n\n[roles]\nfront_end = [\"dns:{FRONT_END_NAME}\"]\nrelay_agent = [\"dns:*.agents.rampart.test\"]\noperator = [\"uri:{OPERATOR_URI}\"]\n\n[credentials]\nrest_secret = \"{REST_SECRET}\"\nlifetime = 3600\n\n[turn]\nhost = \"localhost\"\noffer = [\"udp\"]",
            pem("server.pem"),
            pem("server.key"),
            pem("ca.pem"),
        );
        if let Some(seconds) = report_interval {
            let _ = writeln!(config, "\n[agents]\nreport_interval = {seconds}");
        }
        std::fs::write(&config_path, config)?;
        let log_path = state_dir.join(format!(
            "control-{}.log",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_millis()
        ));
        let log = File::create(&log_path)?;
        let binary = binary();
        let mut command = match netns {
            Some(ns) => {
                let mut command = Command::new("ip");
                command.args(["netns", "exec", ns]).arg(&binary);
                command
            }
            None => Command::new(&binary),
        };
        let child = crate::tools::die_with_parent(&mut command)
            .arg("serve")
            .arg("--config")
            .arg(&config_path)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("spawning {}", binary.display()))?;
        let mut service = ControlService {
            child,
            dir: state_dir.to_owned(),
            log_path,
            address,
        };
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            let probe = || TcpStream::connect_timeout(&address, Duration::from_millis(200)).is_ok();
            let up = match netns {
                Some(ns) => crate::netns::run_in(ns, probe),
                None => probe(),
            };
            if up {
                return Ok(service);
            }
            if let Ok(Some(status)) = service.child.try_wait() {
                bail!("rampart-control exited ({status}):\n{}", service.log());
            }
            if Instant::now() > deadline {
                bail!(
                    "rampart-control did not listen on {address}:\n{}",
                    service.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The process id (of `ip netns exec`'s child once it has exec'd: the service itself).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_else(|e| format!("(no log: {e})"))
    }

    /// Kills the service (SIGKILL) and reaps it; the state directory stays.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ControlService {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        eprintln!(
            "----- rampart-control log ({}) -----\n{}-----",
            self.log_path.display(),
            self.log()
        );
    }
}

/// A temporary directory for a test's PKI and control state.
pub fn temp_dir() -> anyhow::Result<TempDir> {
    Ok(tempfile::Builder::new()
        .prefix("rampart-control-test-")
        .tempdir()?)
}

/// A current-thread runtime for a test's gRPC calls to control.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

/// Media credentials (username, password) control issues to `user`, for its default lifetime.
pub fn issue_credentials(
    rt: &tokio::runtime::Runtime,
    front_end: &mut FrontEndClient<Channel>,
    user: &str,
) -> (String, String) {
    let issued = rt
        .block_on(front_end.issue_media_credentials(
            proto::control::v1::IssueMediaCredentialsRequest {
                user: user.into(),
                lifetime_seconds: None,
            },
        ))
        .expect("IssueMediaCredentials")
        .into_inner();
    (issued.username, issued.password)
}

/// Polls `condition` every 20 ms until it holds, for at most `limit` (then panics saying
/// `what`); how long it took.
pub fn wait_until(limit: Duration, what: &str, mut condition: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    loop {
        if condition() {
            return start.elapsed();
        }
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}
