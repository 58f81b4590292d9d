//! `cargo xtask`: Rampart's build, run and test tasks, and the tool chain they need.
//!
//! Every build, run and test task first runs [`setup`], which installs what is missing and is
//! quick when nothing is, so the two commands in the README work on a fresh Debian 12 machine
//! and in CI alike. (`certs` needs no tool chain and skips it, as does `run --no-build`.)

mod all_in_one;
mod certs;
mod setup;
mod util;

use std::{ffi::OsString, path::PathBuf, process::ExitCode, time::Instant};

use anyhow::{Context as _, Result};
use clap::{Args, Parser, Subcommand};

use crate::util::{cargo, workspace_root};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "Rampart's build, run and test tasks"
)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building and testing Rampart needs (idempotent; quick when all is there).
    Setup,
    /// Set up, then build the agent `rampart` (with its embedded XDP program) and the control
    /// service `rampart-control`.
    Build(BuildArgs),
    /// Set up, build, then start the all-in-one edge: the control service and the agent,
    /// linked over mutual TLS with the certificates of `cargo xtask certs` (made if missing).
    /// Arguments after `--` go to the agent (e.g. `cargo xtask run -- --log debug`); with
    /// `-- --config FILE` the agent uses that file instead of the all-in-one's.
    Run {
        #[command(flatten)]
        build: BuildArgs,
        /// Start the agent alone on its embedded default configuration, without control.
        #[arg(long)]
        no_control: bool,
        /// Use the binaries next to this xtask (or in the target directory), without setup
        /// or build.
        #[arg(long)]
        no_build: bool,
        /// The development certificates and configurations (default: `dev-certs` in the
        /// target directory).
        #[arg(long)]
        certs: Option<PathBuf>,
        /// Arguments for `rampart`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Set up, then `cargo fmt --check`, clippy with warnings denied, and every test.
    Test,
    /// Set up, then measure the XDP program's ns/packet in the kernel (BPF_PROG_TEST_RUN, in a
    /// network namespace of its own; needs root). Results belong in docs/benchmarks.md.
    BenchXdp,
    /// Set up, build in release, then run the load test (needs root): the same TURN workload
    /// against Rampart with XDP, Rampart in userspace and coturn, in network namespaces, with
    /// the side-by-side table, target/loadtest/report.{json,svg,md}. Arguments after `--` go
    /// to `rampart-loadgen suite` (e.g. `-- --size 1200 --burst 10`).
    Loadtest {
        /// The short run (under 5 minutes); without it, the full run.
        #[arg(long)]
        quick: bool,
        /// Arguments for `rampart-loadgen suite`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Make a development CA and certificates for the control service's mutual TLS (server,
    /// front-end, relay agent, operator) and a control configuration that uses them. Keeps
    /// files that exist unless --force.
    Certs {
        /// Where to write them (default: `dev-certs` in the target directory).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Replace existing files, the CA included.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Args)]
struct BuildArgs {
    /// Build with the release profile.
    #[arg(long)]
    release: bool,
}

fn main() -> ExitCode {
    match run(Cli::parse().task) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("xtask: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(task: Task) -> Result<ExitCode> {
    match task {
        Task::Setup => setup::run().map(|()| ExitCode::SUCCESS),
        Task::Build(args) => {
            setup::run()?;
            build(&args).map(|()| ExitCode::SUCCESS)
        }
        Task::Run {
            build: args,
            no_control,
            no_build,
            certs,
            args: agent_args,
        } => {
            let profile = if args.release { "release" } else { "debug" };
            let binaries = if no_build {
                // Next to this xtask when it runs from a target directory, as in tests.
                std::env::current_exe()
                    .ok()
                    .and_then(|exe| exe.parent().map(PathBuf::from))
                    .filter(|dir| dir.join("rampart").is_file())
                    .unwrap_or_else(|| util::target_dir().join(profile))
            } else {
                setup::run()?;
                build(&args)?;
                util::target_dir().join(profile)
            };
            all_in_one::run(all_in_one::Options {
                binaries,
                certs: certs.unwrap_or_else(|| util::target_dir().join("dev-certs")),
                no_control,
                agent_args,
            })
        }
        Task::Test => test(),
        Task::Certs { out, force } => {
            let out = out.unwrap_or_else(|| util::target_dir().join("dev-certs"));
            certs::run(&certs::Options { out, force }).map(|()| ExitCode::SUCCESS)
        }
        Task::Loadtest { quick, args } => {
            setup::run()?;
            loadtest(quick, &args)
        }
        Task::BenchXdp => {
            setup::run()?;
            bench_xdp().map(|()| ExitCode::SUCCESS)
        }
    }
}

/// The benchmark is an ignored test of relay-user (`tests/xdp_datapath.rs`), so it shares the
/// namespace topology of the datapath tests. The program is always built in release mode by
/// aya-build; the test's own profile does not matter for the numbers.
fn bench_xdp() -> Result<()> {
    let mut cmd = cargo();
    cmd.args([
        "test",
        "--package",
        "relay-user",
        "--test",
        "xdp_datapath",
        "--",
        "--ignored",
        "--exact",
        "bench_xdp",
        "--nocapture",
        "--test-threads=1",
    ]);
    util::run_checked(&mut cmd)
}

/// The load test runs release binaries: a debug build measures the compiler's checks.
fn loadtest(quick: bool, args: &[OsString]) -> Result<ExitCode> {
    let mut cmd = cargo();
    cmd.args([
        "build",
        "--release",
        "--package",
        "relay-user",
        "--bin",
        "rampart",
        "--package",
        "rampart-loadgen",
        "--bin",
        "rampart-loadgen",
    ]);
    util::run_checked(&mut cmd)?;
    let binary = util::target_dir().join("release").join("rampart-loadgen");
    let status = std::process::Command::new(&binary)
        .arg("suite")
        .args(["--profile", if quick { "quick" } else { "full" }])
        .arg("--out")
        .arg(util::target_dir().join("loadtest"))
        .args(args)
        .current_dir(workspace_root())
        .status()
        .with_context(|| format!("running {}", binary.display()))?;
    Ok(if status.success() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn build(args: &BuildArgs) -> Result<()> {
    let mut cmd = cargo();
    cmd.args([
        "build",
        "--package",
        "relay-user",
        "--bin",
        "rampart",
        "--package",
        "control",
        "--bin",
        "rampart-control",
        "--package",
        "rampart-psom",
        "--bin",
        "rampart-conference-server",
    ]);
    if args.release {
        cmd.arg("--release");
    }
    util::run_checked(&mut cmd)
}

/// Runs every check even when an earlier one failed, so one run shows everything to fix.
fn test() -> Result<ExitCode> {
    setup::run()?;
    let steps: [(&str, &[&str]); 3] = [
        ("fmt", &["fmt", "--all", "--check"]),
        (
            "clippy",
            &[
                "clippy",
                "--workspace",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ],
        ),
        ("test", &["test", "--workspace", "--no-fail-fast"]),
    ];
    let mut results = Vec::new();
    for (name, args) in steps {
        eprintln!("\nxtask: ==> cargo {}", args.join(" "));
        let started = Instant::now();
        let status = cargo()
            .args(args)
            .current_dir(workspace_root())
            .status()
            .with_context(|| format!("running cargo {name}"))?;
        results.push((name, status.success(), started.elapsed()));
    }

    eprintln!("\nxtask: summary");
    for (name, ok, elapsed) in &results {
        let verdict = if *ok { "ok" } else { "FAILED" };
        eprintln!("  {name:<8} {verdict:<7} {:>6.1} s", elapsed.as_secs_f64());
    }
    let failed: Vec<&str> = results
        .iter()
        .filter(|(_, ok, _)| !ok)
        .map(|(name, _, _)| *name)
        .collect();
    if failed.is_empty() {
        eprintln!("xtask: all checks passed");
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("xtask: failed: {}", failed.join(", "));
        Ok(ExitCode::FAILURE)
    }
}
