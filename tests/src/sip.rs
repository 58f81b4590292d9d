//! Real SIP peers for the SIP-over-TLS Access Edge: sipp (Debian's `sip-tester`) as the
//! caller ([`SippUac`]) and as the internal server behind the proxy ([`SippUas`]), Kamailio
//! as a reference TLS proxy and the baseline of the SIP benchmark ([`Kamailio`]), a
//! throughput measurement through any proxy ([`measure_throughput`]) and the CPU time a
//! proxy's processes used ([`process_tree_cpu_time`]), for the cost per call.
//!
//! # sipp without TLS
//! Debian's sipp is built without OpenSSL: `sipp -v` lists no `TLS` among its features and
//! `-t l1` stops with "To use a TLS transport you must compile SIPp with OpenSSL". So sipp
//! speaks TCP here, and TLS bridges of this module (tokio-rustls, in the test process) put
//! TLS on the wire:
//!
//! ```text
//! sipp UAC --TCP--> client bridge ==TLS==> proxy ==TLS==> server bridge --TCP--> sipp UAS
//! ```
//!
//! One TCP connection of sipp is one TLS connection on the wire (`-t t1`: one for the whole
//! run; `-t tn`: one per call). The client bridge listens on the caller's source IP and
//! connects to the proxy from that IP, so a test can place a legitimate caller on 127.0.0.1
//! and a flood on 127.0.0.2; it verifies the proxy's certificate against the test CA. The
//! server bridge presents the given certificate. The scenarios (`tests/sipp/`) write
//! `SIP/2.0/TLS` and `;transport=tls` themselves, so the proxy sees what a TLS client sends;
//! the caller's Via and Contact carry sipp's own address, not the bridge's, so a proxy must
//! answer over the connection a request came in on (RFC 3261 18.2.2), which is what a TLS
//! edge does anyway. The UAS's Contact names the server bridge (`-key contact_hostport`).
//!
//! # Scenarios and keywords
//! `uac_register.xml` (REGISTER sip:[domain], expects 200), `uac_invite.xml` (INVITE, optional
//! 100/180/183, 200 with its Record-Route learned, ACK and BYE along the route set, 200) and
//! `uas.xml` (answers both). Custom keywords go through `-key NAME VALUE`: `domain`,
//! `from_domain` (the caller's domain) and `contact_hostport` (the UAS's TLS address);
//! `[service]` is `-s`, the callee or registering user.
//!
//! # sipp's results
//! Each run writes its files into a temporary directory (the scenario is copied there,
//! because sipp names some files after the scenario's path): the statistics (`-trace_stat
//! -stf`, `;`-separated, a header line then one snapshot per `-fd` second and a final one,
//! whose `SuccessfulCall(C)`, `FailedCall(C)`, `TotalCallCreated` and `Failed*(C)` columns
//! are read), the message counts (`-trace_counts`: per scenario line `N_NAME_Sent`,
//! `N_CODE_Recv`, `_Retrans`, `_Timeout`, `_Unexp` columns and `ElapsedTime` in
//! `h:m:s:microseconds`), the unexpected messages (`-trace_err`) and the final screen
//! (`-trace_screen`). sipp exits 0 when every call succeeded, 1 when one failed, 97/99 when
//! it was stopped or processed no call, 255 (-1) or 254 (-2) on a fatal error.
//!
//! # Kamailio
//! Run in the foreground (`-DD -E`) on a configuration written from `tests/kamailio/` into a
//! temporary directory, with its runtime directory (`-Y`) and pid file (`-P`) there too, so
//! nothing under /etc or the system's runtime directories is touched. Kamailio forks worker
//! processes that outlive a SIGKILLed main process, so it runs as the first process of a
//! PID namespace of its own (`unshare --pid --fork --kill-child`): when the test (or its
//! thread) ends, the whole namespace goes.
//!
//! A missing tool fails the test with the command that installs it.

use std::fmt;
use std::fs;
use std::io::Write as _;
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use rustls::pki_types::{CertificateDer, ServerName};

use crate::client::loopback;
use crate::{Proto, ports, tools};

pub const SIPP_HINT: &str = "sip-tester (sipp)";
pub const KAMAILIO_HINT: &str = "kamailio and kamailio-tls-modules";
/// The SIP domain of the scenarios (`-key domain`) unless a test sets another.
pub const DOMAIN: &str = "rampart.test";
/// The callee and registering user (`-s`, `[service]`) unless a test sets another.
pub const SERVICE: &str = "bob";
/// The UAS scenario's file in `tests/sipp/`.
pub const UAS_SCENARIO: &str = "uas.xml";

/// How long a server (sipp UAS, Kamailio) may take to accept connections.
const STARTUP: Duration = Duration::from_secs(10);
/// How long a bridge waits for a TCP connect or a TLS handshake.
const CONNECT: Duration = Duration::from_secs(5);
/// Bridge errors kept for diagnostics.
const MAX_ERRORS: usize = 50;

/// The directory of the sipp scenarios (`tests/sipp/`).
pub fn scenario_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("sipp")
}

/// A caller scenario of `tests/sipp/`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scenario {
    /// `uac_register.xml`: REGISTER, 200.
    Register,
    /// `uac_invite.xml`: INVITE, (100), 180, 200, ACK, BYE, 200.
    Invite,
}

impl Scenario {
    pub fn file_name(self) -> &'static str {
        match self {
            Scenario::Register => "uac_register.xml",
            Scenario::Invite => "uac_invite.xml",
        }
    }

    pub fn path(self) -> PathBuf {
        scenario_dir().join(self.file_name())
    }
}

// ------------------------------------------------------------------------------------------
// TLS bridges

/// A TLS bridge running on a tokio runtime of its own (one worker thread); stops, closing
/// its connections, on drop.
pub struct TlsBridge {
    addr: SocketAddr,
    errors: Arc<Mutex<Vec<String>>>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl TlsBridge {
    /// Plain TCP in, on a free port of `source_ip`; TLS out to `target`, from `source_ip`,
    /// verifying the server's certificate against `ca` for `server_name`.
    pub fn client(
        source_ip: IpAddr,
        target: SocketAddr,
        ca: &CertificateDer<'static>,
        server_name: &str,
    ) -> anyhow::Result<TlsBridge> {
        Self::client_with_certificate(source_ip, target, ca, server_name, None)
    }

    /// As [`TlsBridge::client`], presenting `client` (certificate chain and key, PEM) when
    /// given: mutual TLS, as an internal server or a partner edge connects.
    pub fn client_with_certificate(
        source_ip: IpAddr,
        target: SocketAddr,
        ca: &CertificateDer<'static>,
        server_name: &str,
        client: Option<(&str, &str)>,
    ) -> anyhow::Result<TlsBridge> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.clone())?;
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
        let config = match client {
            Some((cert_pem, key_pem)) => {
                let (certs, key) =
                    crate::certs::certificate_and_key(cert_pem.as_bytes(), key_pem.as_bytes())
                        .context("the bridge's client certificate")?;
                builder.with_client_auth_cert(certs, key)?
            }
            None => builder.with_no_client_auth(),
        };
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let name = ServerName::try_from(server_name.to_owned())
            .with_context(|| format!("{server_name:?} is not a server name"))?;
        let listener = std::net::TcpListener::bind(SocketAddr::new(source_ip, 0))
            .with_context(|| format!("binding the client bridge on {source_ip}"))?;
        Self::run(listener, move |plain| {
            let connector = connector.clone();
            let name = name.clone();
            async move {
                let socket = match target {
                    SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
                    SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
                };
                socket.bind(SocketAddr::new(source_ip, 0))?;
                let tcp = tokio::time::timeout(CONNECT, socket.connect(target))
                    .await
                    .with_context(|| format!("connecting to {target}: timed out"))?
                    .with_context(|| format!("connecting to {target}"))?;
                tcp.set_nodelay(true)?;
                let tls = tokio::time::timeout(CONNECT, connector.connect(name, tcp))
                    .await
                    .with_context(|| format!("TLS handshake with {target}: timed out"))?
                    .with_context(|| format!("TLS handshake with {target}"))?;
                pump(plain, tls).await
            }
        })
    }

    /// TLS in, on `listener` (bound by the caller, so its port is known before any peer
    /// starts), presenting `cert_pem` (a chain) and `key_pem`; plain TCP out to `backend`.
    pub fn server(
        listener: std::net::TcpListener,
        backend: SocketAddr,
        cert_pem: &str,
        key_pem: &str,
    ) -> anyhow::Result<TlsBridge> {
        let (certs, key) =
            crate::certs::certificate_and_key(cert_pem.as_bytes(), key_pem.as_bytes())
                .context("the bridge's certificate")?;
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        Self::run(listener, move |tcp| {
            let acceptor = acceptor.clone();
            async move {
                let tls = tokio::time::timeout(CONNECT, acceptor.accept(tcp))
                    .await
                    .context("TLS handshake: timed out")?
                    .context("TLS handshake")?;
                let plain = tokio::time::timeout(CONNECT, tokio::net::TcpStream::connect(backend))
                    .await
                    .with_context(|| format!("connecting to {backend}: timed out"))?
                    .with_context(|| format!("connecting to {backend}"))?;
                pump(plain, tls).await
            }
        })
    }

    /// Accepts on `listener` and hands each connection to `serve` on the bridge's runtime.
    fn run<F, Fut>(listener: std::net::TcpListener, serve: F) -> anyhow::Result<TlsBridge>
    where
        F: Fn(tokio::net::TcpStream) -> Fut + Send + 'static,
        Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let addr = listener.local_addr()?;
        listener.set_nonblocking(true)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("sip-tls-bridge")
            .enable_all()
            .build()?;
        let listener = {
            let _context = runtime.enter();
            tokio::net::TcpListener::from_std(listener)?
        };
        let errors: Arc<Mutex<Vec<String>>> = Arc::default();
        let errors_of_loop = errors.clone();
        runtime.spawn(async move {
            loop {
                let (tcp, peer) = match listener.accept().await {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        record(&errors_of_loop, format!("accept on {addr}: {error}"));
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let errors = errors_of_loop.clone();
                let connection = serve(tcp);
                tokio::spawn(async move {
                    if let Err(error) = connection.await {
                        record(&errors, format!("{peer} -> {addr}: {error:#}"));
                    }
                });
            }
        });
        Ok(TlsBridge {
            addr,
            errors,
            runtime: Some(runtime),
        })
    }

    /// Where the bridge listens: plain TCP for a client bridge, TLS for a server bridge.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections that failed (connect, handshake, transfer), for failure messages.
    pub fn errors(&self) -> Vec<String> {
        self.errors.lock().map(|e| e.clone()).unwrap_or_default()
    }
}

impl Drop for TlsBridge {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// Copies both ways until either side closes. An abrupt close by the far end (no TLS
/// close_notify, a reset) when sipp or the proxy exits is no error of the bridge.
async fn pump<S>(mut plain: tokio::net::TcpStream, mut tls: S) -> anyhow::Result<()>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    plain.set_nodelay(true)?;
    match tokio::io::copy_bidirectional(&mut plain, &mut tls).await {
        Ok(_) => Ok(()),
        Err(error)
            if matches!(
                error.kind(),
                std::io::ErrorKind::UnexpectedEof
                    | std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::BrokenPipe
            ) =>
        {
            Ok(())
        }
        Err(error) => Err(error.into()),
    }
}

fn record(errors: &Mutex<Vec<String>>, error: String) {
    if let Ok(mut errors) = errors.lock()
        && errors.len() < MAX_ERRORS
    {
        errors.push(error);
    }
}

// ------------------------------------------------------------------------------------------
// Processes

/// A server process whose output goes to a log file; killed on drop (and when the thread
/// that started it ends, see [`tools::die_with_parent`]).
struct Daemon {
    child: Child,
    name: &'static str,
    log: PathBuf,
}

impl Daemon {
    /// Spawns `command` with stderr (and stdout when `stdout_too`) appended to `log`.
    fn spawn(
        name: &'static str,
        command: &mut Command,
        log: &Path,
        stdout_too: bool,
    ) -> anyhow::Result<Daemon> {
        let file = fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let stdout = if stdout_too {
            Stdio::from(file.try_clone()?)
        } else {
            Stdio::null()
        };
        let child = tools::die_with_parent(command)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(Stdio::from(file))
            .spawn()
            .with_context(|| format!("spawning {command:?}"))?;
        Ok(Daemon {
            child,
            name,
            log: log.to_owned(),
        })
    }

    fn ensure_running(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "{} exited early with {status}; its output:\n{}",
                self.name,
                self.log()
            );
        }
        Ok(())
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits (bounded) until `addr` accepts TCP connections, failing early if the process
    /// exits.
    fn wait_for_listener(&mut self, addr: SocketAddr, limit: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            self.ensure_running()?;
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} did not accept on {addr} within {limit:?}; its output:\n{}",
                    self.name,
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Copies a scenario into `dir` (sipp writes some of its files next to the scenario).
fn copy_scenario(from: &Path, dir: &Path) -> anyhow::Result<PathBuf> {
    let name = from.file_name().context("a scenario path names a file")?;
    let to = dir.join(name);
    fs::copy(from, &to).with_context(|| format!("copying {}", from.display()))?;
    Ok(to)
}

fn path_arg(path: &Path) -> anyhow::Result<&str> {
    path.to_str()
        .with_context(|| format!("{} is not UTF-8", path.display()))
}

// ------------------------------------------------------------------------------------------
// sipp UAS

/// How to start a [`SippUas`].
#[derive(Clone, Debug)]
pub struct SippUasBuilder {
    addr: SocketAddr,
    cert_pem: String,
    key_pem: String,
    scenario: PathBuf,
    trace_messages: bool,
}

impl SippUasBuilder {
    /// The TLS address (port 0: a free port). Default 127.0.0.1, a free port.
    pub fn addr(mut self, addr: SocketAddr) -> Self {
        self.addr = addr;
        self
    }

    /// Another UAS scenario (it gets `-key contact_hostport` too). Default `uas.xml`.
    pub fn scenario(mut self, path: impl Into<PathBuf>) -> Self {
        self.scenario = path.into();
        self
    }

    /// Log every message sipp sends and receives (`-trace_msg`), for [`SippUas::messages`].
    /// Off by default: it slows sipp down under load.
    pub fn trace_messages(mut self, on: bool) -> Self {
        self.trace_messages = on;
        self
    }

    pub fn start(self) -> anyhow::Result<SippUas> {
        let sipp = tools::require("sipp", SIPP_HINT);
        // The TLS side first: its port goes into the UAS's Contact.
        let listener = std::net::TcpListener::bind(self.addr)
            .with_context(|| format!("binding the UAS's TLS address {}", self.addr))?;
        let addr = listener.local_addr()?;
        let ip = addr.ip();
        let dir = tempfile::tempdir()?;
        let scenario = copy_scenario(&self.scenario, dir.path())?;
        let errors = dir.path().join("errors.log");
        let stats = dir.path().join("stats.csv");
        let messages = dir.path().join("messages.log");
        let mut last_error = None;
        // sipp's TCP port is picked free and taken by sipp a moment later; another process
        // may take it in between, so try a few.
        for _ in 0..3 {
            let port = ports::free_port(Proto::Tcp, ip)?;
            let sipp_addr = SocketAddr::new(ip, port);
            let mut command = Command::new(&sipp);
            command.current_dir(dir.path()).args([
                "-sf",
                path_arg(&scenario)?,
                "-t",
                "t1",
                "-i",
                &ip.to_string(),
                "-p",
                &port.to_string(),
                "-key",
                "contact_hostport",
                &addr.to_string(),
                "-nostdin",
                "-trace_err",
                "-error_file",
                path_arg(&errors)?,
                "-trace_stat",
                "-stf",
                path_arg(&stats)?,
                "-fd",
                "1",
            ]);
            if self.trace_messages {
                command.args(["-trace_msg", "-message_file", path_arg(&messages)?]);
            }
            let mut process = Daemon::spawn(
                "sipp (UAS)",
                &mut command,
                &dir.path().join("stderr.log"),
                false,
            )?;
            match process.wait_for_listener(sipp_addr, STARTUP) {
                Ok(()) => {
                    let bridge =
                        TlsBridge::server(listener, sipp_addr, &self.cert_pem, &self.key_pem)?;
                    return Ok(SippUas {
                        addr,
                        sipp_addr,
                        bridge,
                        process,
                        dir,
                    });
                }
                Err(error) => last_error = Some(error),
            }
        }
        Err(last_error.unwrap_or_else(|| anyhow::anyhow!("sipp (UAS) did not start")))
    }
}

/// sipp as the internal SIP server behind the proxy, in the background over TLS (through a
/// [`TlsBridge`]); killed on drop. Answers REGISTER and INVITE/ACK/BYE (`uas.xml`).
pub struct SippUas {
    addr: SocketAddr,
    sipp_addr: SocketAddr,
    // Field order is drop order: the bridge first, then sipp, then its directory.
    bridge: TlsBridge,
    process: Daemon,
    dir: tempfile::TempDir,
}

impl SippUas {
    /// `uas.xml` over TLS on a free port of `ip`, presenting `cert_pem`/`key_pem`.
    pub fn start(ip: IpAddr, cert_pem: &str, key_pem: &str) -> anyhow::Result<SippUas> {
        Self::builder(cert_pem, key_pem)
            .addr(SocketAddr::new(ip, 0))
            .start()
    }

    pub fn builder(cert_pem: &str, key_pem: &str) -> SippUasBuilder {
        SippUasBuilder {
            addr: SocketAddr::new(loopback(false), 0),
            cert_pem: cert_pem.to_owned(),
            key_pem: key_pem.to_owned(),
            scenario: scenario_dir().join(UAS_SCENARIO),
            trace_messages: false,
        }
    }

    /// Where the proxy reaches the UAS over TLS (the next hop).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// sipp's own (plain TCP) address behind the bridge.
    pub fn sipp_addr(&self) -> SocketAddr {
        self.sipp_addr
    }

    /// sipp's process id, e.g. for its CPU time ([`process_tree_cpu_time`]).
    pub fn pid(&self) -> u32 {
        self.process.child.id()
    }

    /// The calls the UAS has seen, from its statistics file (written every second, so up to
    /// a second old). None before the first snapshot.
    pub fn calls(&self) -> Option<CallStats> {
        let text = fs::read_to_string(self.dir.path().join("stats.csv")).ok()?;
        CallStats::parse(&text)
    }

    /// Messages sipp received that its scenario did not expect (`-trace_err`).
    pub fn errors(&self) -> String {
        fs::read_to_string(self.dir.path().join("errors.log")).unwrap_or_default()
    }

    /// Every message sent and received, when started with `trace_messages(true)`.
    pub fn messages(&self) -> String {
        fs::read_to_string(self.dir.path().join("messages.log")).unwrap_or_default()
    }

    /// Fails if sipp has exited.
    pub fn ensure_running(&mut self) -> anyhow::Result<()> {
        self.process.ensure_running()
    }

    /// sipp's stderr, the bridge's errors and sipp's unexpected messages.
    pub fn diagnostics(&self) -> String {
        format!(
            "--- sipp UAS stderr ---\n{}\n--- UAS TLS bridge errors ---\n{}\n--- UAS unexpected messages ---\n{}",
            self.process.log(),
            self.bridge.errors().join("\n"),
            tail(&self.errors(), 4000)
        )
    }
}

// ------------------------------------------------------------------------------------------
// sipp UAC

/// A sipp caller run against a proxy's TLS address: a builder, then [`SippUac::run`].
#[derive(Clone, Debug)]
pub struct SippUac {
    scenario: PathBuf,
    target: SocketAddr,
    ca: CertificateDer<'static>,
    server_name: String,
    source_ip: IpAddr,
    service: String,
    domain: String,
    from_domain: Option<String>,
    calls: u64,
    rate: f64,
    max_concurrent: Option<u64>,
    hold: Duration,
    socket_per_call: bool,
    max_sockets: u32,
    recv_timeout: Duration,
    time_limit: Duration,
    trace_messages: bool,
    extra: Vec<String>,
    /// Certificate chain and key (PEM) the bridge presents: mutual TLS.
    client_certificate: Option<(String, String)>,
}

impl SippUac {
    /// One call of `scenario` to `target`, whose certificate must chain to `ca` and name
    /// [`crate::certs::SERVER_NAME`]; from loopback, 10 calls/s, 30 s at most.
    pub fn new(scenario: Scenario, target: SocketAddr, ca: &CertificateDer<'static>) -> SippUac {
        Self::with_scenario_file(scenario.path(), target, ca)
    }

    /// As [`SippUac::new`] with a scenario file of the test's own.
    pub fn with_scenario_file(
        scenario: impl Into<PathBuf>,
        target: SocketAddr,
        ca: &CertificateDer<'static>,
    ) -> SippUac {
        SippUac {
            scenario: scenario.into(),
            target,
            ca: ca.clone(),
            server_name: crate::certs::SERVER_NAME.to_owned(),
            source_ip: loopback(target.is_ipv6()),
            service: SERVICE.to_owned(),
            domain: DOMAIN.to_owned(),
            from_domain: None,
            calls: 1,
            rate: 10.0,
            max_concurrent: None,
            hold: Duration::ZERO,
            socket_per_call: false,
            max_sockets: 1000,
            recv_timeout: Duration::from_secs(5),
            time_limit: Duration::from_secs(30),
            trace_messages: false,
            extra: Vec::new(),
            client_certificate: None,
        }
    }

    /// Connect with this client certificate and key (PEM), as an internal server would.
    pub fn client_certificate(mut self, cert_pem: &str, key_pem: &str) -> Self {
        self.client_certificate = Some((cert_pem.to_owned(), key_pem.to_owned()));
        self
    }

    /// Calls to make (`-m`).
    pub fn calls(mut self, calls: u64) -> Self {
        self.calls = calls;
        self
    }

    /// New calls per second (`-r`).
    pub fn rate(mut self, per_second: f64) -> Self {
        self.rate = per_second;
        self
    }

    /// Calls open at once at most (`-l`); sipp slows down when it is reached.
    pub fn max_concurrent(mut self, calls: u64) -> Self {
        self.max_concurrent = Some(calls);
        self
    }

    /// The caller's source address: `-i` (Via, Contact, SDP) and the address the bridge
    /// connects to the proxy from. Default: loopback of the target's family.
    pub fn source_ip(mut self, ip: IpAddr) -> Self {
        self.source_ip = ip;
        self
    }

    /// The callee or registering user (`-s`, `[service]`).
    pub fn service(mut self, user: &str) -> Self {
        self.service = user.to_owned();
        self
    }

    /// The request's domain (`-key domain`).
    pub fn domain(mut self, domain: &str) -> Self {
        self.domain = domain.to_owned();
        self
    }

    /// The caller's domain in From (`-key from_domain`). Default: the request's domain.
    pub fn from_domain(mut self, domain: &str) -> Self {
        self.from_domain = Some(domain.to_owned());
        self
    }

    /// The name the proxy's certificate must carry. Default [`crate::certs::SERVER_NAME`].
    pub fn server_name(mut self, name: &str) -> Self {
        self.server_name = name.to_owned();
        self
    }

    /// How long a call stays up between ACK and BYE (`-d`). Default 0.
    pub fn hold(mut self, duration: Duration) -> Self {
        self.hold = duration;
        self
    }

    /// One TCP (so TLS) connection per call (`-t tn`) instead of one for the run (`-t t1`).
    pub fn socket_per_call(mut self, on: bool) -> Self {
        self.socket_per_call = on;
        self
    }

    /// With [`SippUac::socket_per_call`], connections open at once at most (`-max_socket`);
    /// past it sipp spreads calls over the open ones. Default 1000.
    pub fn max_sockets(mut self, sockets: u32) -> Self {
        self.max_sockets = sockets;
        self
    }

    /// How long a call waits for an expected message before it fails (`-recv_timeout`).
    /// Default 5 s.
    pub fn recv_timeout(mut self, timeout: Duration) -> Self {
        self.recv_timeout = timeout;
        self
    }

    /// How long the run may take (`-timeout` with `-timeout_error`; the process is killed
    /// 10 s later). Default 30 s.
    pub fn time_limit(mut self, limit: Duration) -> Self {
        self.time_limit = limit;
        self
    }

    /// Log every message (`-trace_msg`) into [`SippRun::message_log`].
    pub fn trace_messages(mut self, on: bool) -> Self {
        self.trace_messages = on;
        self
    }

    /// Any other sipp argument, placed before the target address.
    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.extra.push(arg.into());
        self
    }

    /// Runs sipp to completion (bounded) and reads its results. An error means sipp could
    /// not be run or read; failed calls are in the result.
    pub fn run(&self) -> anyhow::Result<SippRun> {
        let sipp = tools::require("sipp", SIPP_HINT);
        let bridge = TlsBridge::client_with_certificate(
            self.source_ip,
            self.target,
            &self.ca,
            &self.server_name,
            self.client_certificate
                .as_ref()
                .map(|(cert, key)| (cert.as_str(), key.as_str())),
        )?;
        let dir = tempfile::tempdir()?;
        let scenario = copy_scenario(&self.scenario, dir.path())?;
        let stats = dir.path().join("stats.csv");
        let errors = dir.path().join("errors.log");
        let screen = dir.path().join("screen.log");
        let messages = dir.path().join("messages.log");
        let limit_secs = self.time_limit.as_secs().max(1);
        let from_domain = self.from_domain.as_deref().unwrap_or(&self.domain);
        // sipp listens on its -p port (default 5060) even as a TCP client, so callers running
        // at once each need a port of their own: a free one, taken by sipp a moment later
        // (another may take it in between: then sipp exits 254, "Address already in use",
        // and the run is retried on another port).
        let command_on = |port: u16| -> anyhow::Result<Command> {
            let mut command = Command::new(&sipp);
            command.current_dir(dir.path()).args([
                "-sf",
                path_arg(&scenario)?,
                "-t",
                if self.socket_per_call { "tn" } else { "t1" },
                "-i",
                &self.source_ip.to_string(),
                "-p",
                &port.to_string(),
                "-s",
                &self.service,
                "-key",
                "domain",
                &self.domain,
                "-key",
                "from_domain",
                from_domain,
                "-m",
                &self.calls.to_string(),
                "-r",
                &self.rate.to_string(),
                "-d",
                &self.hold.as_millis().to_string(),
                "-recv_timeout",
                &self.recv_timeout.as_millis().max(1).to_string(),
                "-timeout",
                &format!("{limit_secs}s"),
                "-timeout_error",
                "-nostdin",
                "-trace_stat",
                "-stf",
                path_arg(&stats)?,
                "-fd",
                "1",
                "-trace_counts",
                "-trace_err",
                "-error_file",
                path_arg(&errors)?,
                "-trace_screen",
                "-screen_file",
                path_arg(&screen)?,
            ]);
            if self.socket_per_call {
                // sipp refuses to start when its socket limit (default 50000) is not below the
                // open-file limit.
                command.args(["-max_socket", &self.max_sockets.to_string()]);
            }
            if let Some(limit) = self.max_concurrent {
                command.args(["-l", &limit.to_string()]);
            }
            if self.trace_messages {
                command.args(["-trace_msg", "-message_file", path_arg(&messages)?]);
            }
            command.args(&self.extra);
            command.arg(bridge.addr().to_string());
            Ok(command)
        };

        let mut attempt = 0;
        let (finished, wall) = loop {
            attempt += 1;
            // Nothing of a failed attempt may be read as this one's.
            for file in [&stats, &errors, &screen, &messages] {
                let _ = fs::remove_file(file);
            }
            while let Some(counts) = find_counts_file(dir.path()) {
                fs::remove_file(counts)?;
            }
            let port = ports::free_port(Proto::Tcp, self.source_ip)?;
            let started = Instant::now();
            let finished = tools::run_bounded(
                &mut command_on(port)?,
                Duration::from_secs(limit_secs) + Duration::from_secs(10),
            )?;
            let port_taken = finished.status.code() == Some(254)
                && finished.stderr.contains("Address already in use");
            if !port_taken || attempt == 3 {
                break (finished, started.elapsed());
            }
        };

        let stats_text = fs::read_to_string(&stats).unwrap_or_default();
        let calls = CallStats::parse(&stats_text).with_context(|| {
            format!(
                "sipp wrote no statistics; its output:\n{}",
                finished.output()
            )
        })?;
        let counts_text = find_counts_file(dir.path())
            .and_then(|path| fs::read_to_string(path).ok())
            .unwrap_or_default();
        let (messages_counted, elapsed) = MessageCounts::parse(&counts_text).unwrap_or_default();
        let diagnostics = format!(
            "sipp {:?} -> {} exited with {}\n--- stderr ---\n{}\n--- final screen ---\n{}\n--- UAC TLS bridge errors ---\n{}\n--- unexpected messages ---\n{}",
            self.scenario.file_name().unwrap_or_default(),
            self.target,
            finished.status,
            finished.stderr.trim(),
            tail(&fs::read_to_string(&screen).unwrap_or_default(), 4000),
            bridge.errors().join("\n"),
            tail(&fs::read_to_string(&errors).unwrap_or_default(), 4000),
        );
        Ok(SippRun {
            exit_code: finished.status.code(),
            calls,
            messages: messages_counted,
            elapsed: elapsed.filter(|e| !e.is_zero()).unwrap_or(wall),
            message_log: fs::read_to_string(&messages).unwrap_or_default(),
            diagnostics,
        })
    }
}

fn find_counts_file(dir: &Path) -> Option<PathBuf> {
    fs::read_dir(dir)
        .ok()?
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .find(|path| {
            path.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.ends_with("_counts.csv"))
        })
}

/// The last `max` bytes of `text` (on a character boundary).
fn tail(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut start = text.len() - max;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    &text[start..]
}

/// What a sipp caller run did.
#[derive(Debug)]
pub struct SippRun {
    /// sipp's exit code: 0 when every call succeeded.
    pub exit_code: Option<i32>,
    pub calls: CallStats,
    pub messages: MessageCounts,
    /// From sipp's start to its last statistics (sipp's own clock), else the run's wall time.
    pub elapsed: Duration,
    /// Every message, when the run was built with `trace_messages(true)`.
    pub message_log: String,
    /// sipp's stderr, final screen and unexpected messages, and the bridge's errors.
    pub diagnostics: String,
}

impl SippRun {
    /// sipp exited 0 after `calls` successful calls and no failed one.
    pub fn all_succeeded(&self, calls: u64) -> bool {
        self.exit_code == Some(0) && self.calls.successful == calls && self.calls.failed == 0
    }

    /// Panics with the diagnostics unless [`SippRun::all_succeeded`].
    pub fn assert_all_succeeded(&self, calls: u64) {
        assert!(
            self.all_succeeded(calls),
            "expected {calls} successful calls and exit code 0, got {:?} and exit code {:?}\n{}",
            self.calls,
            self.exit_code,
            self.diagnostics
        );
    }
}

/// Call counters of sipp's statistics file (cumulative columns of its last line).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CallStats {
    /// `TotalCallCreated`.
    pub created: u64,
    /// `SuccessfulCall(C)`.
    pub successful: u64,
    /// `FailedCall(C)`.
    pub failed: u64,
    /// The non-zero `Failed*(C)` causes, e.g. `("FailedUnexpectedMessage", 2)`.
    pub failures: Vec<(String, u64)>,
}

impl CallStats {
    /// Reads a `-trace_stat` file: a `;`-separated header line, then snapshots.
    pub fn parse(text: &str) -> Option<CallStats> {
        let row = last_row(text)?;
        let value = |name: &str| {
            row.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| parse_u64(v))
        };
        let failures = row
            .iter()
            .filter_map(|(k, v)| {
                let cause = k.strip_suffix("(C)")?;
                (cause.starts_with("Failed") && cause != "FailedCall")
                    .then(|| (cause.to_owned(), parse_u64(v)))
            })
            .filter(|(_, n)| *n > 0)
            .collect();
        Some(CallStats {
            created: value("TotalCallCreated")?,
            successful: value("SuccessfulCall(C)")?,
            failed: value("FailedCall(C)")?,
            failures,
        })
    }
}

/// Message counters of sipp's `-trace_counts` file (its last line), summed over the
/// scenario's lines.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MessageCounts {
    /// Messages sipp sent (requests for a caller), 100 Trying aside.
    pub sent: u64,
    /// Messages sipp received as the scenario expected them, 100 Trying aside.
    pub received: u64,
    /// 100 Trying sent or received: hop by hop, a stateful proxy makes them itself.
    pub trying: u64,
    pub retransmissions: u64,
    pub timeouts: u64,
    pub unexpected: u64,
}

impl MessageCounts {
    /// Messages that went end to end through the proxy, as sipp counted them: sent plus
    /// received, 100 Trying aside (6 per INVITE/180/200/ACK/BYE/200 call, 2 per REGISTER).
    pub fn end_to_end(&self) -> u64 {
        self.sent + self.received
    }

    /// The counts and sipp's `ElapsedTime`, from a `-trace_counts` file.
    pub fn parse(text: &str) -> Option<(MessageCounts, Option<Duration>)> {
        let row = last_row(text)?;
        let mut counts = MessageCounts::default();
        let mut elapsed = None;
        for (column, value) in row {
            if column == "ElapsedTime" {
                elapsed = parse_elapsed(value);
                continue;
            }
            // "<line>_<name>_<kind>", e.g. "0_INVITE_Sent", "4_200_Recv".
            let Some((rest, kind)) = column.rsplit_once('_') else {
                continue;
            };
            let Some((_, name)) = rest.split_once('_') else {
                continue;
            };
            let n = parse_u64(value);
            let trying = name == "100";
            match kind {
                "Sent" | "Recv" if trying => counts.trying += n,
                "Sent" => counts.sent += n,
                "Recv" => counts.received += n,
                "Retrans" => counts.retransmissions += n,
                "Timeout" => counts.timeouts += n,
                "Unexp" => counts.unexpected += n,
                _ => {}
            }
        }
        Some((counts, elapsed))
    }
}

/// The header line zipped with the last data line of a sipp CSV file.
fn last_row(text: &str) -> Option<Vec<(&str, &str)>> {
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let header = lines.next()?;
    let last = lines.next_back()?;
    Some(
        header
            .split(';')
            .map(str::trim)
            .zip(last.split(';').map(str::trim))
            .collect(),
    )
}

fn parse_u64(value: &str) -> u64 {
    value.trim().parse().unwrap_or(0)
}

/// sipp's "hh:mm:ss:microseconds" (or "hh:mm:ss").
fn parse_elapsed(value: &str) -> Option<Duration> {
    let parts: Vec<u64> = value
        .split(':')
        .map(|p| p.trim().parse().ok())
        .collect::<Option<_>>()?;
    let (h, m, s, us) = match parts[..] {
        [h, m, s, us] => (h, m, s, us),
        [h, m, s] => (h, m, s, 0),
        _ => return None,
    };
    Some(Duration::from_secs(h * 3600 + m * 60 + s) + Duration::from_micros(us))
}

// ------------------------------------------------------------------------------------------
// Throughput

/// The load of a [`measure_throughput`] run.
#[derive(Clone, Debug)]
pub struct Load {
    /// How long the calls are offered: `rate * duration` calls in all.
    pub duration: Duration,
    /// New calls per second offered (`-r`); set it above what the proxy can do to find
    /// its limit, where `max_concurrent` then paces sipp.
    pub rate: f64,
    /// Calls open at once at most (`-l`).
    pub max_concurrent: u64,
    /// The caller's source address. None: loopback.
    pub source_ip: Option<IpAddr>,
    /// One TLS connection per call instead of one for the run.
    pub socket_per_call: bool,
}

impl Default for Load {
    fn default() -> Self {
        Load {
            duration: Duration::from_secs(10),
            rate: 2000.0,
            max_concurrent: 200,
            source_ip: None,
            socket_per_call: false,
        }
    }
}

/// What a [`measure_throughput`] run achieved.
#[derive(Debug)]
pub struct Throughput {
    pub successful: u64,
    pub failed: u64,
    pub elapsed: Duration,
    /// Successful calls per second.
    pub calls_per_second: f64,
    /// End-to-end messages (see [`MessageCounts::end_to_end`]) per second.
    pub messages_per_second: f64,
    pub run: SippRun,
}

impl fmt::Display for Throughput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} calls in {:.2} s: {:.0} calls/s, {:.0} messages/s through the proxy, {} failed",
            self.successful,
            self.elapsed.as_secs_f64(),
            self.calls_per_second,
            self.messages_per_second,
            self.failed
        )
    }
}

/// Offers INVITE/ACK/BYE calls through the proxy at `proxy` (TLS, certificate chaining to
/// `ca`) as `load` says and measures what completes. The proxy's next hop must be a
/// [`SippUas`] that is already running. The run is bounded at four times the load's
/// duration plus 30 s.
pub fn measure_throughput(
    proxy: SocketAddr,
    ca: &CertificateDer<'static>,
    load: &Load,
) -> anyhow::Result<Throughput> {
    measure_caller(SippUac::new(Scenario::Invite, proxy, ca), load)
}

/// As [`measure_throughput`] with a caller of the test's own (its scenario, domain, server
/// name): `load` sets its calls, rate, concurrency, connections, source and time limit.
/// Messages per second count what the scenario sends and receives (2 per REGISTER).
pub fn measure_caller(uac: SippUac, load: &Load) -> anyhow::Result<Throughput> {
    let calls = ((load.rate * load.duration.as_secs_f64()).ceil() as u64).max(1);
    let mut uac = uac
        .calls(calls)
        .rate(load.rate)
        .max_concurrent(load.max_concurrent)
        .socket_per_call(load.socket_per_call)
        .time_limit(load.duration * 4 + Duration::from_secs(30));
    if let Some(ip) = load.source_ip {
        uac = uac.source_ip(ip);
    }
    let run = uac.run()?;
    let seconds = run.elapsed.as_secs_f64().max(1e-6);
    Ok(Throughput {
        successful: run.calls.successful,
        failed: run.calls.failed,
        elapsed: run.elapsed,
        calls_per_second: run.calls.successful as f64 / seconds,
        messages_per_second: run.messages.end_to_end() as f64 / seconds,
        run,
    })
}

// ------------------------------------------------------------------------------------------
// Kamailio

const KAMAILIO_CFG: &str = include_str!("../kamailio/kamailio.cfg");
const KAMAILIO_TLS_CFG: &str = include_str!("../kamailio/tls.cfg");

/// How to run a [`Kamailio`].
#[derive(Clone, Debug)]
pub struct KamailioConfig {
    /// The TLS listener (port 0: a free port).
    pub listen: SocketAddr,
    /// Where every request goes, over TLS.
    pub next_hop: SocketAddr,
    /// The server certificate (chain) and key, PEM.
    pub cert_pem: String,
    pub key_pem: String,
    /// Transaction stateful (tm's t_relay) or stateless (forward()). Default stateful.
    pub stateful: bool,
    /// Worker processes for TCP/TLS (`tcp_children`). Default 2, the machine's cores.
    pub tcp_children: u32,
    /// Shared memory, MB (`-m`). Default 1024: with tm, finished transactions stay for its
    /// wait timer (5 s), and 128 MB runs out at about 1000 calls/s.
    pub shm_mb: u32,
    /// Log level (`debug`: 0 warnings and errors, 1 notices, 2 info, 3 debug). Default 0.
    pub debug: i32,
    /// The memory manager for shared and private memory (`-x` and `-X`: `qm`, `fm` or
    /// `tlsf`). None: Kamailio's default, `qm`, which Debian's build (`DBG_SR_MEMORY`) runs
    /// with its debugging records; `fm` or `tlsf` is what a busy production proxy runs
    /// (4-5x less CPU per call through the TLS proxy of the SIP benchmark).
    pub memory_manager: Option<String>,
}

impl KamailioConfig {
    pub fn new(
        listen_tls_port: u16,
        next_hop: SocketAddr,
        cert_pem: &str,
        key_pem: &str,
    ) -> KamailioConfig {
        KamailioConfig {
            listen: SocketAddr::new(loopback(next_hop.is_ipv6()), listen_tls_port),
            next_hop,
            cert_pem: cert_pem.to_owned(),
            key_pem: key_pem.to_owned(),
            stateful: true,
            tcp_children: 2,
            shm_mb: 1024,
            debug: 0,
            memory_manager: None,
        }
    }

    /// The configuration files for a listener on `listen`, in `dir`: (kamailio.cfg, tls.cfg).
    fn render(&self, listen: SocketAddr, dir: &Path) -> anyhow::Result<(String, String)> {
        let cert = dir.join("cert.pem");
        let key = dir.join("key.pem");
        let tls_cfg = dir.join("tls.cfg");
        let tls = KAMAILIO_TLS_CFG
            .replace("@CERT@", path_arg(&cert)?)
            .replace("@KEY@", path_arg(&key)?);
        let mode = if self.stateful {
            "#!define STATEFUL"
        } else {
            "#!define STATELESS"
        };
        let cfg = KAMAILIO_CFG
            .replace("@MODE@", mode)
            .replace("@NEXT_HOP@", &self.next_hop.to_string())
            .replace("@DEBUG@", &self.debug.to_string())
            .replace("@TCP_CHILDREN@", &self.tcp_children.to_string())
            .replace("@LISTEN@", &listen.to_string())
            .replace("@TLS_CFG@", path_arg(&tls_cfg)?);
        Ok((cfg, tls))
    }
}

/// Kamailio as a TLS proxy to a fixed next hop, in the foreground; killed (with all its
/// worker processes) on drop.
pub struct Kamailio {
    addr: SocketAddr,
    // Field order is drop order: the processes before their directory.
    process: Daemon,
    dir: tempfile::TempDir,
}

impl Kamailio {
    /// Listens on 127.0.0.1:`listen_tls_port` (0: a free port) and forwards every request,
    /// statefully, to `next_hop` over TLS; waits until the listener accepts.
    pub fn start(
        listen_tls_port: u16,
        next_hop: SocketAddr,
        cert_pem: &str,
        key_pem: &str,
    ) -> anyhow::Result<Kamailio> {
        Self::start_with(&KamailioConfig::new(
            listen_tls_port,
            next_hop,
            cert_pem,
            key_pem,
        ))
    }

    pub fn start_with(config: &KamailioConfig) -> anyhow::Result<Kamailio> {
        let kamailio = tools::require("kamailio", KAMAILIO_HINT);
        let unshare = tools::require("unshare", "util-linux (unshare)");
        check_tls_module(&kamailio);
        let dir = tempfile::tempdir()?;
        let run_dir = dir.path().join("run");
        fs::create_dir(&run_dir)?;
        write_private(&dir.path().join("cert.pem"), &config.cert_pem)?;
        write_private(&dir.path().join("key.pem"), &config.key_pem)?;
        let attempts = if config.listen.port() == 0 { 3 } else { 1 };
        let mut last_error = None;
        for _ in 0..attempts {
            let listen = if config.listen.port() == 0 {
                SocketAddr::new(
                    config.listen.ip(),
                    ports::free_port(Proto::Tcp, config.listen.ip())?,
                )
            } else {
                config.listen
            };
            let (cfg, tls) = config.render(listen, dir.path())?;
            let cfg_path = dir.path().join("kamailio.cfg");
            fs::write(&cfg_path, cfg)?;
            fs::write(dir.path().join("tls.cfg"), tls)?;
            // The workers outlive a killed main process: a PID namespace of its own takes
            // them all down with it (`--kill-child` SIGKILLs its first process when unshare
            // dies). Without root, a user namespace makes that possible.
            let mut command = Command::new(&unshare);
            if !nix::unistd::geteuid().is_root() {
                command.args(["--user", "--map-root-user"]);
            }
            command.args(["--pid", "--fork", "--kill-child"]);
            command.arg(&kamailio).args([
                "-DD",
                "-E",
                "-f",
                path_arg(&cfg_path)?,
                "-Y",
                path_arg(&run_dir)?,
                "-P",
                path_arg(&run_dir.join("kamailio.pid"))?,
                "-w",
                path_arg(dir.path())?,
                "-m",
                &config.shm_mb.to_string(),
                "-M",
                "16",
            ]);
            if let Some(manager) = &config.memory_manager {
                command.args(["-x", manager, "-X", manager]);
            }
            let mut process = Daemon::spawn(
                "kamailio",
                &mut command,
                &dir.path().join("kamailio.log"),
                true,
            )?;
            match process.wait_for_listener(listen, STARTUP) {
                Ok(()) => {
                    return Ok(Kamailio {
                        addr: listen,
                        process,
                        dir,
                    });
                }
                Err(error) => last_error = Some(error),
            }
        }
        Err(last_error.unwrap_or_else(|| anyhow::anyhow!("kamailio did not start")))
    }

    /// The TLS listener.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Kamailio's log (stderr, `-E`).
    pub fn log(&self) -> String {
        self.process.log()
    }

    /// The configuration it runs.
    pub fn config_text(&self) -> String {
        fs::read_to_string(self.dir.path().join("kamailio.cfg")).unwrap_or_default()
    }

    /// CPU time (user + system) used so far by all of Kamailio's processes, from /proc: for
    /// benchmarks that compare the cost per call.
    pub fn cpu_time(&self) -> Duration {
        process_tree_cpu_time(self.process.child.id())
    }

    /// Fails if Kamailio has exited.
    pub fn ensure_running(&mut self) -> anyhow::Result<()> {
        self.process.ensure_running()
    }
}

/// Kamailio without `tls.so` fails to start with a message about the module; say which
/// package brings it instead.
fn check_tls_module(kamailio: &Path) {
    let Ok(help) = tools::run_bounded(Command::new(kamailio).arg("-h"), Duration::from_secs(10))
    else {
        return;
    };
    // "-L path      Modules search path (default: /usr/lib/x86_64-linux-gnu/kamailio/modules)"
    let text = format!("{}{}", help.stdout, help.stderr);
    let Some(dir) = text
        .lines()
        .find(|l| l.trim_start().starts_with("-L "))
        .and_then(|l| l.split("(default: ").nth(1))
        .and_then(|rest| rest.split(')').next())
    else {
        return;
    };
    let module = Path::new(dir.trim()).join("tls.so");
    assert!(
        module.is_file(),
        "Kamailio's TLS module {} is not installed: `cargo xtask setup` installs \
         kamailio-tls-modules (CI installs it through xtask)",
        module.display()
    );
}

fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    file.write_all(text.as_bytes())?;
    Ok(())
}

/// CPU time (utime + stime, from /proc) used so far by the process `pid` and all its living
/// descendants (/proc/PID/task/*/children): the cost of a proxy under test, e.g. the
/// `rampart` process's or [`Kamailio::cpu_time`]. Linux counts it in ticks of 1/100 s.
pub fn process_tree_cpu_time(pid: u32) -> Duration {
    let mut ticks = 0u64;
    let mut pending = vec![pid];
    let mut seen = 0;
    while let Some(pid) = pending.pop() {
        seen += 1;
        if seen > 10_000 {
            break;
        }
        if let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) {
            // Fields after the ")" that closes the command name: state is field 3, utime 14,
            // stime 15.
            if let Some((_, rest)) = stat.rsplit_once(')') {
                let fields: Vec<&str> = rest.split_whitespace().collect();
                ticks += fields
                    .get(11)
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0);
                ticks += fields
                    .get(12)
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0);
            }
        }
        if let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) {
            for task in tasks.filter_map(Result::ok) {
                if let Ok(children) = fs::read_to_string(task.path().join("children")) {
                    pending.extend(
                        children
                            .split_whitespace()
                            .filter_map(|c| c.parse::<u32>().ok()),
                    );
                }
            }
        }
    }
    Duration::from_millis(ticks * 10)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_sipp_statistics() {
        let text = "StartTime;CurrentTime;TotalCallCreated;SuccessfulCall(P);SuccessfulCall(C);FailedCall(P);FailedCall(C);FailedCannotSendMessage(C);FailedUnexpectedMessage(C);\n\
                    2026-01-01\t00:00:00.0 1;x;1;1;1;0;0;0;0;\n\
                    2026-01-01\t00:00:00.0 1;y;5;1;3;1;2;0;2;\n";
        let stats = CallStats::parse(text).unwrap();
        assert_eq!(
            stats,
            CallStats {
                created: 5,
                successful: 3,
                failed: 2,
                failures: vec![("FailedUnexpectedMessage".into(), 2)],
            }
        );
    }

    #[test]
    fn reads_sipp_message_counts() {
        let text = "CurrentTime;ElapsedTime;0_INVITE_Sent;0_INVITE_Retrans;1_100_Recv;1_100_Retrans;1_100_Timeout;1_100_Unexp;2_180_Recv;4_200_Recv;4_200_Timeout;5_ACK_Sent;6_Pause_Sessions;7_BYE_Sent;8_200_Recv;8_200_Unexp;\n\
                    t;00:00:02:500000;10;0;10;0;0;0;10;10;1;10;0;10;9;1;\n";
        let (counts, elapsed) = MessageCounts::parse(text).unwrap();
        assert_eq!(counts.sent, 30);
        assert_eq!(counts.received, 29);
        assert_eq!(counts.trying, 10);
        assert_eq!(counts.timeouts, 1);
        assert_eq!(counts.unexpected, 1);
        assert_eq!(counts.end_to_end(), 59);
        assert_eq!(elapsed, Some(Duration::from_millis(2500)));
    }
}
