//! `cargo xtask fuzz`: each fuzz target for a bounded time; `cargo xtask test` runs them after
//! the tests.
//!
//! The targets live in `relay-user/fuzz`, a cargo-fuzz project outside the workspace:
//! `sip_parser` feeds libFuzzer's inputs to the SIP `Message::parse`, re-parses what
//! `to_bytes` makes of every message it accepts, and runs the stream `Framer` over the same
//! bytes; `turn_input` feeds them to the STUN codec and to a TURN server holding an allocation
//! and a channel, as a client's datagram, a client's stream and a peer's datagram. cargo-fuzz
//! needs a nightly compiler (`-Z sanitizer`), but not rust-src: only the targets and their
//! dependencies are instrumented. They build into `target/fuzz`, and what libFuzzer learns goes
//! to `target/fuzz/corpus`, so the repository keeps only the seeds.

use std::{
    collections::BTreeSet,
    fmt::Write as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::util::{path_with_cargo_bin, probe, show, target_dir, workspace_root};

/// The rustup toolchain cargo-fuzz builds with.
const TOOLCHAIN: &str = "nightly";
/// The cargo-fuzz project, relative to the workspace root.
const FUZZ_DIR: &str = "relay-user/fuzz";
pub const TARGETS: [&str; 2] = ["sip_parser", "turn_input"];

/// Builds every target and fuzzes each for `seconds`. An error when one cannot run, or when it
/// finds an input that crashes, hangs or exhausts a target; the error names that input.
pub fn run(seconds: u64) -> Result<()> {
    let mut failures = Vec::new();
    for target in TARGETS {
        eprintln!("xtask: fuzzing {target} for {seconds} s");
        if let Err(error) = run_target(target, seconds) {
            failures.push(format!("{error:#}"));
        }
    }
    if failures.is_empty() {
        Ok(())
    } else {
        bail!(failures.join("\n"))
    }
}

fn run_target(target: &str, seconds: u64) -> Result<()> {
    let nightly = probe(Command::new("rustup").args(["run", TOOLCHAIN, "rustc", "--version"]))
        .is_some_and(|out| out.status.success());
    if !nightly {
        bail!(
            "the rustup toolchain `{TOOLCHAIN}` is not installed, and cargo-fuzz needs it \
             (`cargo xtask test --fuzz-seconds 0` skips fuzzing)"
        );
    }

    let fuzz_dir = workspace_root().join(FUZZ_DIR);
    let artifacts = fuzz_dir.join("artifacts").join(target);
    let before = files_in(&artifacts);
    let build_dir = target_dir().join("fuzz");
    // libFuzzer adds the inputs it finds interesting to the first corpus directory: a scratch
    // one that persists between runs, while the seeds in the repository stay as they are.
    let corpus = build_dir.join("corpus").join(target);
    std::fs::create_dir_all(&corpus).with_context(|| format!("creating {}", corpus.display()))?;

    let mut cmd = Command::new("rustup");
    cmd.args(["run", TOOLCHAIN, "cargo", "fuzz", "run"])
        .args(["--fuzz-dir", FUZZ_DIR])
        .arg("--target-dir")
        .arg(&build_dir)
        .arg(target)
        .arg(&corpus)
        .arg(fuzz_dir.join("corpus").join(target))
        .arg("--")
        .arg(format!("-max_total_time={seconds}"))
        // A hang is a finding too, and must not outlast the time budget.
        .arg("-timeout=10")
        .current_dir(workspace_root())
        .env("PATH", path_with_cargo_bin());
    let shown = show(&cmd);
    eprintln!("xtask: $ {shown}");
    let status = cmd
        .status()
        .with_context(|| format!("could not start `{shown}`"))?;
    if status.success() {
        return Ok(());
    }

    let found: Vec<PathBuf> = files_in(&artifacts).difference(&before).cloned().collect();
    if found.is_empty() {
        bail!("`{shown}` failed ({status})");
    }
    let mut text = format!("the fuzzer found an input that breaks {target}:");
    for file in &found {
        let _ = write!(text, "\n    {}", file.display());
    }
    let _ = write!(
        text,
        "\nreplay it with: cargo +{TOOLCHAIN} fuzz run --fuzz-dir {FUZZ_DIR} {target} FILE"
    );
    bail!(text)
}

/// The files libFuzzer leaves in an artifacts directory (crash-*, timeout-*, oom-*, leak-*).
fn files_in(dir: &Path) -> BTreeSet<PathBuf> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|entry| entry.ok().map(|e| e.path()))
                .collect()
        })
        .unwrap_or_default()
}
