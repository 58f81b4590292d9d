//! The relays under test, each started in the edge namespace of an [`EdgeTopology`]: listening
//! on the external side (10.201.1.1), relaying from the internal side (10.201.2.1), TURN REST
//! credentials with the same secret, the whole unprivileged port range for relays, peers on
//! the internal subnet allowed.

use std::fs::File;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use rampart_tests::client::TurnClient;
use rampart_tests::control::{self, ControlPki, ControlService};

use crate::isolation;
use rampart_tests::process::Rampart;
use rampart_tests::tools::{self, die_with_parent};
use rampart_tests::topology::{EDGE_EXT4, EDGE_INT4, EdgeTopology};
use rampart_tests::{Proto, REST_SECRET};
use serde::Serialize;
use tempfile::TempDir;

/// Relay ports of every system: all unprivileged ones, so memory can be measured with tens
/// of thousands of allocations.
const RELAY_PORTS: (u16, u16) = (1024, 65535);
/// The agent retries its control link with a backoff of at most 15 s.
const CONTROL_LINK_WAIT: Duration = Duration::from_secs(30);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum System {
    /// Rampart with the XDP fast path (native mode on the edge's veths).
    RampartXdp,
    /// Rampart relaying everything in userspace (XDP off), each loop's peer datagrams gathered
    /// on one socket by the `sk_lookup` program (the default).
    RampartUserspace,
    /// The same with each relay socket read on its own (`gather_peers = false`: one epoll
    /// poller per loop, `recvmmsg` per readable socket): what gathering is measured against.
    RampartUserspaceEpoll,
    /// coturn from the Debian package.
    Coturn,
}

impl System {
    pub const ALL: [System; 4] = [
        System::RampartXdp,
        System::RampartUserspace,
        System::RampartUserspaceEpoll,
        System::Coturn,
    ];

    pub fn name(self) -> &'static str {
        match self {
            System::RampartXdp => "rampart-xdp",
            System::RampartUserspace => "rampart-userspace",
            System::RampartUserspaceEpoll => "rampart-userspace-epoll",
            System::Coturn => "coturn",
        }
    }

    pub fn parse(name: &str) -> Option<System> {
        System::ALL.into_iter().find(|s| s.name() == name)
    }
}

/// A relay running in the topology's edge namespace, stopped on drop.
pub struct Running {
    pub system: System,
    pub pid: u32,
    /// Its UDP TURN listener.
    pub server: SocketAddr,
    pub secret: String,
    process: Process,
    /// rampart-userspace: the service once started, and the PKI its `[control]` link trusts
    /// (the service is started only for the latency-under-reports measurement) in its
    /// directory, removed last.
    control: Option<(Option<ControlService>, ControlPki, TempDir)>,
}

/// Where the control service listens, inside the edge namespace.
const CONTROL_ADDRESS: SocketAddr =
    SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 7443);

enum Process {
    Rampart(Box<Rampart>),
    Coturn { child: Child, log: PathBuf },
}

impl Running {
    pub fn start(system: System, topology: &EdgeTopology) -> Result<Running> {
        match system {
            System::RampartXdp | System::RampartUserspace | System::RampartUserspaceEpoll => {
                let mode = if system == System::RampartXdp {
                    "native"
                } else {
                    "off"
                };
                let mut config = topology
                    .agent_config(mode)
                    .with_relay_ports(RELAY_PORTS.0, RELAY_PORTS.1)
                    .with_log("info")
                    .with_limit("allocations_total", "1000000")
                    .with_limit("allocations_per_user", "100")
                    // Every allocation of the test comes from one client address.
                    .with_limit("unauthenticated_per_second", "1000000.0")
                    .with_limit("unauthenticated_burst", "1000000.0");
                // The relay gets one CPU (isolation::split_cpus pins it there after start):
                // one relay loop, as an operator sets loops to the CPUs the edge may use.
                // Two loops on one CPU measured 22% lower saturation in the quick profile.
                config.relay.push(("loops".into(), "1".into()));
                // The default counters interval, not the XDP tests' every second.
                config.stats_interval = None;
                if system == System::RampartUserspaceEpoll {
                    config.relay.push(("gather_peers".into(), "false".into()));
                }
                // The userspace agent links to a control service that is down until the
                // latency-under-reports measurement starts it (no reports before).
                let control = if system == System::RampartUserspace {
                    let dir = control::temp_dir()?;
                    let pki = ControlPki::create(dir.path())?;
                    config.control = Some(pki.agent_link(CONTROL_ADDRESS));
                    Some((None, pki, dir))
                } else {
                    None
                };
                let rampart = Rampart::start(&config)?;
                let server = rampart.addr(Proto::Udp, IpAddr::V4(EDGE_EXT4));
                Ok(Running {
                    system,
                    pid: rampart.pid(),
                    server,
                    secret: REST_SECRET.to_owned(),
                    process: Process::Rampart(Box::new(rampart)),
                    control,
                })
            }
            System::Coturn => start_coturn(topology),
        }
    }

    /// Start the control service the agent's `[control]` names, telling it to report every
    /// `report_interval` seconds, and wait until its link is up.
    pub fn start_control(&mut self, topology: &EdgeTopology, report_interval: u64) -> Result<()> {
        let Some((service, pki, dir)) = &mut self.control else {
            bail!("{} has no control link", self.system.name());
        };
        let started = ControlService::start_reporting(
            pki,
            &dir.path().join("control"),
            CONTROL_ADDRESS,
            Some(topology.edge.name()),
            Some(report_interval),
        )?;
        // In a deployment the control service runs on other hosts: here it stays off the
        // system's CPU, on the instrument's (whose NAPI threads, which count the packets,
        // preempt it).
        isolation::pin_process(started.pid(), isolation::INSTRUMENT_CPU)?;
        *service = Some(started);
        let deadline = Instant::now() + CONTROL_LINK_WAIT;
        while !self.log().contains("control link up") {
            if Instant::now() > deadline {
                bail!("the agent's control link did not come up within {CONTROL_LINK_WAIT:?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    /// The relay's own log, for a failure message.
    pub fn log(&self) -> String {
        match &self.process {
            Process::Rampart(rampart) => rampart.log(),
            Process::Coturn { log, .. } => std::fs::read_to_string(log).unwrap_or_default(),
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Process::Coturn { child, .. } = &mut self.process {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// coturn configured as Rampart is: UDP on the external address, relays on the internal
/// one over the same port range, TURN REST credentials (`use-auth-secret`) with the same
/// secret, peers on the internal subnet allowed, no TLS/DTLS listeners, no quotas, logging
/// to a file.
fn start_coturn(topology: &EdgeTopology) -> Result<Running> {
    let binary = tools::require("turnserver", "coturn");
    let dir = std::env::temp_dir().join(format!("rampart-loadtest-coturn-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let log = dir.join("turnserver.log");
    let server = SocketAddr::new(IpAddr::V4(EDGE_EXT4), 3478);
    let mut command = Command::new("ip");
    command
        .args(["netns", "exec", topology.edge.name()])
        .arg(binary)
        .args(["-n", "--no-cli", "--no-tls", "--no-dtls", "--simple-log"])
        .arg(format!("--log-file={}", log.display()))
        .arg(format!(
            "--pidfile={}",
            dir.join("turnserver.pid").display()
        ))
        .args(["--listening-ip", &EDGE_EXT4.to_string()])
        .args(["--listening-port", "3478"])
        .args(["--relay-ip", &EDGE_INT4.to_string()])
        .args(["--min-port", &RELAY_PORTS.0.to_string()])
        .args(["--max-port", &RELAY_PORTS.1.to_string()])
        .args(["--use-auth-secret", "--static-auth-secret", REST_SECRET])
        .args(["--realm", rampart_tests::REALM])
        .args(["--allowed-peer-ip", "10.201.2.0-10.201.2.255"])
        .args([
            "--no-multicast-peers",
            "--total-quota",
            "0",
            "--user-quota",
            "0",
        ]);

    let output = File::create(dir.join("turnserver.out"))?;
    let child = die_with_parent(&mut command)
        .stdin(Stdio::null())
        .stdout(output.try_clone()?)
        .stderr(output)
        .spawn()
        .context("starting turnserver")?;
    let mut running = Running {
        system: System::Coturn,
        pid: child.id(),
        server,
        secret: REST_SECRET.to_owned(),
        process: Process::Coturn { child, log },
        control: None,
    };
    // Up once it answers a Binding from the client side.
    let deadline = Instant::now() + Duration::from_secs(15);
    let client_ip = topology.client_ip(false);
    loop {
        if let Process::Coturn { child, .. } = &mut running.process
            && let Some(status) = child.try_wait()?
        {
            bail!("turnserver exited with {status}:\n{}", running.log());
        }
        let answered = rampart_tests::netns::run_in(topology.client.name(), || {
            TurnClient::connect_udp(client_ip, server)
                .and_then(|mut client| client.binding())
                .is_ok()
        });
        if answered {
            return Ok(running);
        }
        if Instant::now() > deadline {
            bail!("turnserver did not answer within 15 s:\n{}", running.log());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
