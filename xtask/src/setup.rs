//! `cargo xtask setup`: installs what building and testing Rampart needs, on Debian 12.
//!
//! Every piece is checked cheaply first (`dpkg-query`, `--version`, an import), and only what
//! is missing is installed, so a second run takes well under a second. The facts behind the
//! recipe (why the Debian compiler, why LLVM 22, which bpf-linker) are in
//! `shared/docs/TOOLCHAIN.md`.

use std::{
    collections::BTreeSet,
    fmt::Write as _,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::util::{cargo, probe, run_checked, show, which};

/// Debian packages, each with the reason the project needs it.
pub const DEBIAN_PACKAGES: &[(&str, &str)] = &[
    (
        "rustc-web",
        "a Rust compiler that ships the `core` source: the XDP program's target \
         (bpfel-unknown-none) has no prebuilt `core`, and rustup's toolchains here lack rust-src",
    ),
    (
        "cargo-web",
        "the cargo of rustc-web; builds the XDP program",
    ),
    (
        "rust-web-src",
        "the `core` source for `-Z build-std=core` (/usr/lib/rustlib/src/rust)",
    ),
    (
        "llvm-22-dev",
        "LLVM 22 (rustc-web's LLVM), which bpf-linker is built against",
    ),
    (
        "libpolly-22-dev",
        "needed to link bpf-linker against LLVM 22",
    ),
    ("zlib1g-dev", "needed to link bpf-linker against LLVM 22"),
    ("libzstd-dev", "needed to link bpf-linker against LLVM 22"),
    (
        "bpftool",
        "inspecting loaded XDP programs and maps; BPF_PROG_TEST_RUN micro-benchmarks",
    ),
    (
        "iproute2",
        "`ip netns`, veth pairs and XDP inspection for the namespace tests",
    ),
    (
        "ethtool",
        "veth statistics (`ethtool -S`): the load test counts the frames its own instrument \
         failed to deliver apart from the system's loss",
    ),
    (
        "coturn",
        "an established TURN server and its turnutils_* clients: real peers for interop tests \
         and the baseline for benchmarks",
    ),
    (
        "nftables",
        "`nft`, for the test in which the internal host drops connections from the edge",
    ),
    ("python3-pip", "pip, to install the Python packages below"),
    (
        "sip-tester",
        "sipp: real SIP clients and servers (UAC/UAS) for the Access Edge tests and the SIP \
         benchmark (Debian builds it without TLS: the tests put a TLS bridge in front of it)",
    ),
    (
        "kamailio",
        "an established SIP proxy: the baseline TLS proxy of the SIP benchmark",
    ),
    ("kamailio-tls-modules", "Kamailio's TLS transport (tls.so)"),
    (
        "chromium",
        "a real browser's WebRTC stack, for tests/tests/chromium_call.rs",
    ),
];

/// Python packages (import name, pip requirement, reason).
pub const PYTHON_PACKAGES: &[(&str, &str, &str)] = &[
    (
        "aioice",
        "aioice",
        "an independent ICE/STUN/TURN client implementation for interop tests",
    ),
    (
        "grpc",
        "grpcio",
        "an independent gRPC implementation: the control API's interop test calls it with stubs \
         generated from the .proto files",
    ),
    (
        "grpc_tools",
        "grpcio-tools",
        "generates those Python stubs from proto/proto (grpc_tools.protoc)",
    ),
];

/// The rustup toolchain name under which rampart-xdp's build script (relay-user/xdp) finds the Debian compiler.
const DEBIAN_TOOLCHAIN: &str = "debian";
const BPF_LINKER_VERSION: &str = "0.13.0";
/// Runs the SIP parser's fuzz target (`relay-user/fuzz`) on the nightly toolchain.
const CARGO_FUZZ_VERSION: &str = "0.13.2";
const LLVM_DIR: &str = "/usr/lib/llvm-22";

/// One thing to install, with why.
enum Step {
    Apt(Vec<&'static str>),
    RustupLink,
    RustComponents(Vec<&'static str>),
    BpfLinker { found: Option<String> },
    CargoFuzz,
    Pip(Vec<&'static str>),
}

impl Step {
    fn describe(&self) -> String {
        match self {
            Step::Apt(packages) => {
                let mut text = String::from("Debian packages:");
                for (name, why) in DEBIAN_PACKAGES {
                    if packages.contains(name) {
                        let _ = write!(text, "\n      {name}: {why}");
                    }
                }
                text
            }
            Step::RustupLink => format!(
                "rustup toolchain `{DEBIAN_TOOLCHAIN}` -> /usr: rampart-xdp's build script (relay-user/xdp) builds \
                 the XDP program with it (aya-build runs `rustup run {DEBIAN_TOOLCHAIN} cargo`)"
            ),
            Step::RustComponents(components) => format!(
                "rust components {}: `cargo xtask test` runs them",
                components.join(", ")
            ),
            Step::BpfLinker { found } => format!(
                "bpf-linker {BPF_LINKER_VERSION} built against LLVM 22 (found: {}): links the \
                 XDP program's LLVM bitcode into a BPF object",
                found.as_deref().unwrap_or("none")
            ),
            Step::CargoFuzz => format!(
                "cargo-fuzz {CARGO_FUZZ_VERSION}: `cargo xtask test` fuzzes the SIP parser and framer \
                 with it (relay-user/fuzz, libFuzzer on the nightly toolchain)"
            ),
            Step::Pip(requirements) => {
                let mut text = String::from("Python packages:");
                for (_, requirement, why) in PYTHON_PACKAGES {
                    if requirements.contains(requirement) {
                        let _ = write!(text, "\n      {requirement}: {why}");
                    }
                }
                text
            }
        }
    }

    /// The commands that carry the step out, in order.
    fn commands(&self) -> Vec<Command> {
        match self {
            Step::Apt(packages) => {
                let mut update = Command::new("apt-get");
                update.arg("update");
                let mut install = Command::new("apt-get");
                install
                    .env("DEBIAN_FRONTEND", "noninteractive")
                    .args(["install", "-y"])
                    .args(packages);
                vec![update, install]
            }
            Step::RustupLink => {
                let mut link = Command::new("rustup");
                link.args(["toolchain", "link", DEBIAN_TOOLCHAIN, "/usr"]);
                vec![link]
            }
            Step::RustComponents(components) => {
                let mut add = Command::new("rustup");
                add.args(["component", "add"]).args(components);
                vec![add]
            }
            Step::BpfLinker { .. } => {
                // Without PATH and LLVM_PREFIX pointing at LLVM 22 the link fails with
                // "unable to find library -lLLVM".
                let mut install = cargo();
                let path = std::env::join_paths(
                    std::iter::once(std::path::PathBuf::from(format!("{LLVM_DIR}/bin")))
                        .chain(std::env::split_paths(&crate::util::path_with_cargo_bin())),
                )
                .unwrap_or_default();
                install
                    .env("PATH", path)
                    .env("LLVM_PREFIX", LLVM_DIR)
                    .env("LLVM_SYS_221_PREFIX", LLVM_DIR)
                    .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION])
                    .args(["--locked", "--force", "--no-default-features"])
                    .args(["--features", "llvm-22"]);
                vec![install]
            }
            Step::CargoFuzz => {
                let mut install = cargo();
                install
                    .args(["install", "cargo-fuzz", "--version", CARGO_FUZZ_VERSION])
                    .arg("--locked");
                vec![install]
            }
            Step::Pip(requirements) => {
                let mut install = Command::new("python3");
                install
                    .args([
                        "-m",
                        "pip",
                        "install",
                        "--quiet",
                        "--disable-pip-version-check",
                    ])
                    .args(requirements);
                vec![install]
            }
        }
    }

    /// The step as shell lines someone can paste, with `sudo` where root is needed.
    fn shell_lines(&self) -> Vec<String> {
        match self {
            Step::Apt(packages) => vec![
                "sudo apt-get update".to_owned(),
                format!("sudo apt-get install -y {}", packages.join(" ")),
            ],
            Step::BpfLinker { .. } => vec![format!(
                "PATH={LLVM_DIR}/bin:$PATH LLVM_PREFIX={LLVM_DIR} LLVM_SYS_221_PREFIX={LLVM_DIR} \
                 cargo install bpf-linker --version {BPF_LINKER_VERSION} --locked --force \
                 --no-default-features --features llvm-22"
            )],
            _ => self.commands().iter().map(show).collect(),
        }
    }

    fn needs_root(&self) -> bool {
        matches!(self, Step::Apt(_))
    }
}

pub fn run() -> Result<()> {
    let started = Instant::now();
    let steps = plan()?;
    if steps.is_empty() {
        eprintln!(
            "xtask: setup: tool chain complete ({} ms)",
            started.elapsed().as_millis()
        );
        return Ok(());
    }

    eprintln!("xtask: setup: installing what is missing:");
    for step in &steps {
        eprintln!("  - {}", step.describe());
    }

    let mut blockers = Vec::new();
    if steps.iter().any(Step::needs_root) {
        if which("apt-get").is_none() || which("dpkg-query").is_none() {
            blockers.push(
                "this is not a Debian system (no apt-get/dpkg-query); Rampart's machines run \
                 Debian 12",
            );
        } else if !is_root()? {
            blockers.push("installing Debian packages needs root");
        }
    }
    if which("rustup").is_none() {
        blockers.push(
            "rustup is not installed (Rampart's machines come with it: the workspace builds with \
             rustup's stable toolchain, rustc >= 1.95)",
        );
    }
    if !blockers.is_empty() {
        let mut text = format!(
            "{}.\nRun these, then `cargo xtask setup` again:\n",
            blockers.join("; ")
        );
        for step in &steps {
            for line in step.shell_lines() {
                let _ = writeln!(text, "    {line}");
            }
        }
        bail!(text);
    }

    for step in &steps {
        let step_started = Instant::now();
        match step {
            Step::Pip(_) => pip_install(step)?,
            _ => {
                for mut cmd in step.commands() {
                    run_checked(&mut cmd)?;
                }
            }
        }
        if let Step::Apt(packages) = step {
            keep_services_off(packages);
        }
        eprintln!("xtask: setup: done in {}", secs(step_started.elapsed()));
    }

    // Everything installed must now pass its check; otherwise say which.
    let left = plan()?;
    if !left.is_empty() {
        let what: Vec<String> = left.iter().map(Step::describe).collect();
        bail!(
            "setup ran but these are still missing:\n  - {}",
            what.join("\n  - ")
        );
    }
    eprintln!(
        "xtask: setup: tool chain complete ({})",
        secs(started.elapsed())
    );
    Ok(())
}

/// Checks every piece and returns the steps that would install what is missing, in the order
/// they must run (bpf-linker needs LLVM from apt, the toolchain link needs rustc-web).
fn plan() -> Result<Vec<Step>> {
    let mut plan = Vec::new();

    let missing = missing_debian_packages();
    if !missing.is_empty() {
        plan.push(Step::Apt(missing));
    }

    let linked =
        probe(Command::new("rustup").args(["run", DEBIAN_TOOLCHAIN, "rustc", "--version"]))
            .is_some_and(|out| out.status.success());
    if !linked {
        plan.push(Step::RustupLink);
    }

    let components: Vec<&str> = [("fmt", "rustfmt"), ("clippy", "clippy")]
        .into_iter()
        .filter(|(subcommand, _)| {
            !probe(cargo().args([subcommand, "--version"])).is_some_and(|out| out.status.success())
        })
        .map(|(_, component)| component)
        .collect();
    if !components.is_empty() {
        plan.push(Step::RustComponents(components));
    }

    let found = which("bpf-linker")
        .and_then(|linker| probe(Command::new(linker).arg("--version")))
        .filter(|out| out.status.success())
        .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_owned());
    let wanted = format!("bpf-linker {}", minor_prefix(BPF_LINKER_VERSION));
    if !found.as_deref().is_some_and(|v| v.starts_with(&wanted)) {
        plan.push(Step::BpfLinker { found });
    }

    if !probe(cargo().args(["fuzz", "--version"])).is_some_and(|out| out.status.success()) {
        plan.push(Step::CargoFuzz);
    }

    let requirements: Vec<&str> = PYTHON_PACKAGES
        .iter()
        .filter(|(module, _, _)| {
            !probe(Command::new("python3").args(["-c", &format!("import {module}")]))
                .is_some_and(|out| out.status.success())
        })
        .map(|(_, requirement, _)| *requirement)
        .collect();
    if !requirements.is_empty() {
        plan.push(Step::Pip(requirements));
    }

    Ok(plan)
}

/// Packages of [`DEBIAN_PACKAGES`] that dpkg does not report as installed. All of them when
/// dpkg-query is not there.
fn missing_debian_packages() -> Vec<&'static str> {
    let names: Vec<&str> = DEBIAN_PACKAGES.iter().map(|(name, _)| *name).collect();
    let installed: BTreeSet<String> = probe(
        Command::new("dpkg-query")
            .args(["-W", "-f", "${Package}\t${db:Status-Abbrev}\n"])
            .args(&names),
    )
    .map(|out| {
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|line| line.split_once('\t'))
            .filter(|(_, status)| status.starts_with("ii"))
            .map(|(name, _)| name.to_owned())
            .collect()
    })
    .unwrap_or_default();
    names
        .into_iter()
        .filter(|name| !installed.contains(*name))
        .collect()
}

/// pip, falling back to `--break-system-packages` when python3 is a Debian-managed
/// interpreter (PEP 668) rather than a private one like pyenv's.
fn pip_install(step: &Step) -> Result<()> {
    for mut cmd in step.commands() {
        eprintln!("xtask: $ {}", show(&cmd));
        let out = cmd.output().context("could not start python3")?;
        if out.status.success() {
            continue;
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        if stderr.contains("externally-managed-environment") {
            eprintln!("xtask: python3 is Debian's own; installing with --break-system-packages");
            run_checked(cmd.arg("--break-system-packages"))?;
        } else {
            bail!("`{}` failed ({}):\n{stderr}", show(&cmd), out.status);
        }
    }
    Ok(())
}

/// Packages whose install may start a system service (on a systemd machine) that takes a
/// port the tests or the agent use, with that port. The project only uses their binaries,
/// started by the tests themselves.
const SERVICES_OFF: &[(&str, &str)] = &[
    // turnserver on UDP 3478, the port the agent's default configuration uses.
    ("coturn", "coturn"),
    // kamailio's packaged configuration listens on SIP's 5060 (UDP and TCP).
    ("kamailio", "kamailio"),
];

/// Switches off, right after the install, the services of [`SERVICES_OFF`] that it started.
/// (On a machine without systemd, such as a container whose policy-rc.d forbids starting
/// services, nothing was started.)
fn keep_services_off(installed: &[&str]) {
    if !std::path::Path::new("/run/systemd/system").is_dir() {
        return;
    }
    for (package, service) in SERVICES_OFF {
        if !installed.contains(package) {
            continue;
        }
        let active = probe(Command::new("systemctl").args(["is-active", "--quiet", service]))
            .is_some_and(|out| out.status.success());
        if active {
            eprintln!("xtask: setup: stopping the {service} service (tests start their own)");
            let _ = run_checked(Command::new("systemctl").args(["disable", "--now", service]));
        }
    }
}

fn is_root() -> Result<bool> {
    let status =
        std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let euid = status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        .context("no Uid line in /proc/self/status")?;
    Ok(euid == "0")
}

/// "0.13.0" -> "0.13.": any patch release of the pinned minor version will do.
fn minor_prefix(version: &str) -> String {
    let mut parts = version.split('.');
    let major = parts.next().unwrap_or("0");
    let minor = parts.next().unwrap_or("0");
    format!("{major}.{minor}.")
}

fn secs(elapsed: Duration) -> String {
    format!("{:.1} s", elapsed.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minor_prefix_keeps_major_and_minor() {
        assert_eq!(minor_prefix("0.13.0"), "0.13.");
        assert_eq!(minor_prefix("1.2.3"), "1.2.");
    }

    #[test]
    fn package_table_has_no_duplicates() {
        let names: BTreeSet<_> = DEBIAN_PACKAGES.iter().map(|(name, _)| name).collect();
        assert_eq!(names.len(), DEBIAN_PACKAGES.len());
    }

    #[test]
    fn blocked_apt_step_prints_sudo_commands() {
        let lines = Step::Apt(vec!["coturn", "bpftool"]).shell_lines();
        assert_eq!(lines[0], "sudo apt-get update");
        assert_eq!(lines[1], "sudo apt-get install -y coturn bpftool");
    }
}
