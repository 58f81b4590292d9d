//! Private network namespaces: a loopback of the test's own, so that a server bug that sends
//! traffic to a forbidden address (169.254.169.254, 0.0.0.0, ...) cannot reach anything but
//! sockets the test put there to catch it.
//!
//! Network namespaces are per thread: [`Netns::run`] enters the namespace on a new thread,
//! and everything created there (sockets, and processes spawned from it, which inherit the
//! thread's namespace) lives inside it. The calling thread stays where it was.

use std::fs::File;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context, bail};
use nix::sched::{CloneFlags, setns};
use nix::unistd::Uid;

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A named namespace (`ip netns add`), deleted on drop.
pub struct Netns {
    name: String,
}

/// True when this process may create namespaces. Otherwise prints why the calling test is
/// skipped and returns false, except under CI (`CI=true`), where it panics: CI must run the
/// namespace tests.
pub fn can_create(test: &str) -> bool {
    if Uid::effective().is_root() {
        return true;
    }
    let why = "needs root to create a network namespace (`ip netns add`)";
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{test} {why}, and CI=true: CI must run it as root");
    }
    eprintln!("\n*** SKIPPED {test}: {why} ***\n");
    false
}

impl Netns {
    /// A fresh namespace with its loopback up (127.0.0.1 and ::1).
    pub fn create() -> anyhow::Result<Netns> {
        let name = format!(
            "rampart-t{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        ip(&["netns", "add", &name])?;
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Adds an address to the namespace's loopback, e.g. `169.254.169.254/32`, so a socket
    /// can bind there and observe whether anything is sent to it.
    pub fn add_loopback_address(&self, cidr: &str) -> anyhow::Result<()> {
        // nodad: usable at once, not "tentative" while duplicate detection runs.
        let mut args = vec!["addr", "add", cidr, "dev", "lo"];
        if cidr.contains(':') {
            args.push("nodad");
        }
        self.ip(&args)
    }

    /// `ip -n <ns> ...`
    pub fn ip(&self, args: &[&str]) -> anyhow::Result<()> {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        ip(&all)
    }

    /// Runs `f` on a thread inside the namespace and returns its result; a panic in `f` is
    /// re-raised here.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        run_in(&self.name, f)
    }

    /// `sysctl -w <setting>` inside the namespace (e.g. `net.ipv4.conf.all.forwarding=1`).
    pub fn sysctl(&self, setting: &str) -> anyhow::Result<()> {
        ip(&["netns", "exec", &self.name, "sysctl", "-q", "-w", setting])
    }
}

/// Runs `f` on a thread inside the named namespace (`ip netns add <name>`) and returns its
/// result; a panic in `f` is re-raised here. `f` may borrow from the caller. Sockets `f`
/// creates stay in the namespace when they are used from other threads later.
pub fn run_in<T: Send>(name: &str, f: impl FnOnce() -> T + Send) -> T {
    let path = format!("/run/netns/{name}");
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let ns = File::open(&path).unwrap_or_else(|e| panic!("opening {path}: {e}"));
                setns(&ns, CloneFlags::CLONE_NEWNET)
                    .unwrap_or_else(|e| panic!("setns({path}): {e}"));
                f()
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            eprintln!(
                "warning: could not delete network namespace {}: {e:#}",
                self.name
            );
        }
    }
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .with_context(|| format!("running `ip {}` (iproute2 installed?)", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}
