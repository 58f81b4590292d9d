//! `cargo xtask`: Rampart's build, run and test tasks, and the tool chain they need.
//!
//! Every build, run and test task first runs [`setup`], which installs what is missing and is
//! quick when nothing is, so the two commands in the README work on a fresh Debian 12 machine
//! and in CI alike. (`certs` needs no tool chain and skips it, as does `run --no-build`.)

mod all_in_one;
mod certs;
mod fuzz;
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
    /// Set up, then `cargo fmt --check`, clippy with warnings denied, every test, and a bounded
    /// run of each fuzz target (see `fuzz`).
    Test {
        /// Seconds to fuzz each target (SIP parser, TURN input) after the tests; 0 skips it.
        #[arg(long, value_name = "N", default_value_t = 60)]
        fuzz_seconds: u64,
    },
    /// Set up, then fuzz the SIP parser and stream framer, and the TURN core's input
    /// (relay-user/fuzz: cargo-fuzz on the nightly toolchain), for N seconds each. Fails,
    /// naming the input, if it finds a crash.
    Fuzz {
        #[arg(long, value_name = "N", default_value_t = 60)]
        seconds: u64,
    },
    /// Set up, then measure the XDP program's ns/packet in the kernel (BPF_PROG_TEST_RUN, in a
    /// network namespace of its own; needs root) beside a minimal reference program on the
    /// same frames; writes docs/benchmarks/xdp.json. Tables belong in docs/benchmarks.md.
    BenchXdp,
    /// Set up, build the agent in release, then run the SIP benchmark (`sip_bench` in
    /// rampart-tests, release): the same sipp load over TLS through the Access Edge and
    /// Kamailio (stateless, with tm, and stateless on its default allocator), side by side;
    /// target/sip-bench/report.{md,json}. Other RAMPART_SIP_BENCH_* variables pass through.
    BenchSip {
        /// Seconds of offered calls per run: `rate * seconds` calls (RAMPART_SIP_BENCH_SECONDS;
        /// default 5).
        #[arg(long, value_name = "N")]
        seconds: Option<u64>,
        /// New calls per second offered (RAMPART_SIP_BENCH_RATE; default 20000, above what
        /// two vCPUs carry, so the concurrency cap paces sipp).
        #[arg(long, value_name = "R")]
        rate: Option<f64>,
    },
    /// Set up, build in release, then run the load test (needs root): the same TURN workload
    /// against Rampart with XDP, Rampart in userspace and coturn, in network namespaces, with
    /// the side-by-side table, target/loadtest/{report.json,loadtest.json,report.svg,report.md};
    /// the full run also writes docs/benchmarks/loadtest.{json,svg}. Arguments after `--` go
    /// to `rampart-loadgen suite` (e.g. `-- --generator sockets`, `-- --size 1200`).
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
        Task::Test { fuzz_seconds } => test(fuzz_seconds),
        Task::Fuzz { seconds } => {
            setup::run()?;
            fuzz::run(seconds).map(|()| ExitCode::SUCCESS)
        }
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
        Task::BenchSip { seconds, rate } => {
            setup::run()?;
            bench_sip(seconds, rate).map(|()| ExitCode::SUCCESS)
        }
    }
}

/// The benchmark is an ignored test of rampart-xdp (`relay-user/xdp/tests/xdp_datapath.rs`), so it shares the
/// namespace topology of the datapath tests. The program is always built in release mode by
/// aya-build; the test's own profile does not matter for the numbers. It writes
/// docs/benchmarks/xdp.json, committed beside the tables of docs/benchmarks.md.
fn bench_xdp() -> Result<()> {
    let json = workspace_root()
        .join("docs")
        .join("benchmarks")
        .join("xdp.json");
    if let Some(dir) = json.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut cmd = cargo();
    cmd.env("RAMPART_BENCH_XDP_JSON", &json);
    cmd.args([
        "test",
        "--package",
        "rampart-xdp",
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

/// Builds these (package, binary) pairs in release: benchmarks measure optimised code.
fn build_release(binaries: &[(&str, &str)]) -> Result<()> {
    let mut cmd = cargo();
    cmd.args(["build", "--release"]);
    for (package, binary) in binaries {
        cmd.args(["--package", package, "--bin", binary]);
    }
    util::run_checked(&mut cmd)
}

/// The SIP benchmark is an ignored test of rampart-tests (`tests/sip_bench.rs`), run in
/// release next to a release agent (the test starts the `rampart` of its own profile).
fn bench_sip(seconds: Option<u64>, rate: Option<f64>) -> Result<()> {
    build_release(&[("relay-user", "rampart")])?;
    let mut cmd = cargo();
    cmd.args([
        "test",
        "--release",
        "--package",
        "rampart-tests",
        "--test",
        "sip_bench",
        "--",
        "--ignored",
        "--exact",
        "access_edge_vs_kamailio",
        "--nocapture",
        "--test-threads=1",
    ]);
    if let Some(seconds) = seconds {
        cmd.env("RAMPART_SIP_BENCH_SECONDS", seconds.to_string());
    }
    if let Some(rate) = rate {
        cmd.env("RAMPART_SIP_BENCH_RATE", rate.to_string());
    }
    util::run_checked(&mut cmd)
}

/// The load test runs release binaries: a debug build measures the compiler's checks.
fn loadtest(quick: bool, args: &[OsString]) -> Result<ExitCode> {
    build_release(&[
        ("relay-user", "rampart"),
        // The agent's control link reports to it in the latency-under-reports measurement.
        ("control", "rampart-control"),
        ("rampart-loadgen", "rampart-loadgen"),
    ])?;
    let binary = util::target_dir().join("release").join("rampart-loadgen");
    let out = util::target_dir().join("loadtest");
    let status = std::process::Command::new(&binary)
        .arg("suite")
        .args(["--profile", if quick { "quick" } else { "full" }])
        .arg("--out")
        .arg(&out)
        .args(args)
        .current_dir(workspace_root())
        .status()
        .with_context(|| format!("running {}", binary.display()))?;
    if !status.success() {
        return Ok(ExitCode::FAILURE);
    }
    // The full run's headline numbers are committed beside docs/benchmarks.md.
    if !quick {
        let committed = workspace_root().join("docs").join("benchmarks");
        std::fs::create_dir_all(&committed)?;
        for (from, to) in [
            ("loadtest.json", "loadtest.json"),
            ("report.svg", "loadtest.svg"),
        ] {
            std::fs::copy(out.join(from), committed.join(to))
                .with_context(|| format!("copying {from} to {}", committed.display()))?;
        }
        eprintln!(
            "xtask: written {}/loadtest.json and loadtest.svg",
            committed.display()
        );
    }
    Ok(ExitCode::SUCCESS)
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
fn test(fuzz_seconds: u64) -> Result<ExitCode> {
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
    if fuzz_seconds > 0 {
        eprintln!(
            "\nxtask: ==> fuzz {} for {fuzz_seconds} s each",
            fuzz::TARGETS.join(", ")
        );
        let started = Instant::now();
        let ok = match fuzz::run(fuzz_seconds) {
            Ok(()) => true,
            Err(error) => {
                eprintln!("xtask: fuzz: {error:#}");
                false
            }
        };
        results.push(("fuzz", ok, started.elapsed()));
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
