//! `cargo xtask run`: the all-in-one edge: the control service on its development
//! configuration, the agent on the embedded default with a `[control]` link to it and the
//! Web Conferencing Edge on, and the reference conferencing server dialling the agent's
//! internal port, all over mutual TLS with the certificates of `cargo xtask certs`. Runs until
//! one of them stops or the task gets SIGINT or SIGTERM, and then stops the others.

use std::ffi::OsString;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, ExitStatus};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::certs;

/// How long the control service may take to listen, and the processes to stop.
const START_TIMEOUT: Duration = Duration::from_secs(20);
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(100);

pub struct Options {
    /// Where `rampart` and `rampart-control` are.
    pub binaries: PathBuf,
    /// The development certificates and configurations (made if missing).
    pub certs: PathBuf,
    /// The agent alone on its embedded default, without control.
    pub no_control: bool,
    /// Arguments for `rampart`.
    pub agent_args: Vec<OsString>,
}

/// A child process, stopped with SIGTERM (then SIGKILL) when dropped.
struct Supervised {
    name: &'static str,
    child: Child,
}

impl Supervised {
    fn spawn(name: &'static str, command: &mut Command) -> Result<Self> {
        use std::os::unix::process::CommandExt as _;
        // A task killed outright (SIGKILL cannot be handled) must not leave the edge running
        // on its ports: the kernel sends the children SIGTERM when this thread ends.
        // SAFETY: prctl is async-signal-safe and touches nothing of the parent's state.
        unsafe {
            command.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(Signal::SIGTERM).map_err(std::io::Error::from)
            });
        }
        let child = command
            .spawn()
            .with_context(|| format!("starting {}", command.get_program().display()))?;
        Ok(Self { name, child })
    }

    fn exited(&mut self) -> Result<Option<ExitStatus>> {
        self.child
            .try_wait()
            .with_context(|| format!("waiting for {}", self.name))
    }

    fn stop(&mut self) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        if let Ok(pid) = i32::try_from(self.child.id()) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        }
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(POLL);
        }
        eprintln!(
            "xtask: {} did not stop within {STOP_TIMEOUT:?}; killing it",
            self.name
        );
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        self.stop();
    }
}

pub fn run(options: Options) -> Result<ExitCode> {
    let agent_binary = binary(&options.binaries, "rampart")?;
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, stop.clone()).context("handling signals")?;
    }
    if options.no_control {
        let mut agent = Supervised::spawn(
            "rampart",
            Command::new(&agent_binary).args(&options.agent_args),
        )?;
        return supervise(&stop, &mut [&mut agent]);
    }

    let control_binary = binary(&options.binaries, "rampart-control")?;
    certs::run(&certs::Options {
        out: options.certs.clone(),
        force: false,
    })?;
    let endpoint: SocketAddr = certs::CONTROL_ENDPOINT.parse()?;
    let mut control = Supervised::spawn(
        "rampart-control",
        Command::new(&control_binary)
            .arg("serve")
            .arg("--config")
            .arg(options.certs.join("control.toml")),
    )?;
    wait_until_listening(&mut control, endpoint, &stop)?;

    let own_config = !options
        .agent_args
        .iter()
        .any(|a| a == "--config" || a.to_string_lossy().starts_with("--config="));
    let mut agent_command = Command::new(&agent_binary);
    if own_config {
        agent_command
            .arg("--config")
            .arg(options.certs.join(certs::AGENT_CONFIG));
    }
    let mut agent = Supervised::spawn("rampart", agent_command.args(&options.agent_args))?;
    // The reference conferencing server dials the agent's internal conferencing port (it
    // retries until the agent listens there).
    let certs_dir = &options.certs;
    let mut conference_server = Supervised::spawn(
        "rampart-conference-server",
        Command::new(binary(&options.binaries, "rampart-conference-server")?)
            .args(["--edge", certs::CONFERENCING_INTERNAL])
            .args(["--server-name", certs::CONFERENCING_EDGE_NAME])
            .arg("--ca")
            .arg(certs_dir.join("ca.pem"))
            .arg("--certificate")
            .arg(certs_dir.join("conference-server.pem"))
            .arg("--private-key")
            .arg(certs_dir.join("conference-server.key")),
    )?;
    print_banner(&options.binaries, &options.certs);
    supervise(
        &stop,
        &mut [&mut control, &mut agent, &mut conference_server],
    )
}

fn binary(dir: &Path, name: &str) -> Result<PathBuf> {
    let path = dir.join(name);
    if !path.is_file() {
        bail!(
            "{} is missing: build it (`cargo xtask run` without --no-build does)",
            path.display()
        );
    }
    Ok(path)
}

fn wait_until_listening(
    control: &mut Supervised,
    endpoint: SocketAddr,
    stop: &AtomicBool,
) -> Result<()> {
    let started = Instant::now();
    loop {
        if TcpStream::connect_timeout(&endpoint, POLL).is_ok() {
            return Ok(());
        }
        if let Some(status) = control.exited()? {
            bail!("the control service stopped before listening on {endpoint} ({status})");
        }
        if stop.load(Ordering::Relaxed) {
            bail!("interrupted while the control service was starting");
        }
        if started.elapsed() > START_TIMEOUT {
            bail!("the control service does not listen on {endpoint} after {START_TIMEOUT:?}");
        }
        std::thread::sleep(POLL);
    }
}

/// Waits until a process stops or a signal comes, then stops the others; the exit code is
/// the first stopped process's (success after a signal).
fn supervise(stop: &AtomicBool, processes: &mut [&mut Supervised]) -> Result<ExitCode> {
    loop {
        if stop.load(Ordering::Relaxed) {
            eprintln!("xtask: stopping");
            for process in processes.iter_mut().rev() {
                process.stop();
            }
            return Ok(ExitCode::SUCCESS);
        }
        for index in 0..processes.len() {
            if let Some(status) = processes[index].exited()? {
                eprintln!("xtask: {} stopped ({status})", processes[index].name);
                for process in processes.iter_mut().rev() {
                    process.stop();
                }
                return Ok(if status.success() {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                });
            }
        }
        std::thread::sleep(POLL);
    }
}

fn print_banner(binaries: &Path, certs: &Path) {
    let call = binaries.join("rampart-control");
    let call = call.display();
    let front_end = certs.join("front-end-client.toml");
    let operator = certs.join("operator-client.toml");
    eprintln!(
        "xtask: all-in-one up: control service on {endpoint} (mutual TLS), agent edge-1 \
         linked to it; TURN on 127.0.0.1:3478 and [::1]:3478 (UDP, TCP).\n\
         xtask: media credentials for a user, as a front-end gets them:\n  \
         {call} call -c {front_end} IssueMediaCredentials '{{\"user\": \"alice\"}}'\n\
         xtask: agents and their allocations, as an operator:\n  \
         {call} call -c {operator} ListAgents\n  \
         {call} call -c {operator} ListAllocations\n\
         xtask: Web Conferencing Edge: participants on {conferencing} (TLS), the reference \
         conferencing server dialled in on {internal}; register a conference with \
         RegisterConference, then join with its key.\n\
         xtask: every RPC: {call} rpcs. Ctrl-C stops everything.",
        endpoint = certs::CONTROL_ENDPOINT,
        conferencing = certs::CONFERENCING_EXTERNAL,
        internal = certs::CONFERENCING_INTERNAL,
        front_end = front_end.display(),
        operator = operator.display(),
    );
}
