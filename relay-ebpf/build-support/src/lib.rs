//! What a build script needs to build one of Rampart's eBPF crates (`relay-ebpf`, the load
//! generator's `loadgen-ebpf`) for `bpfel-unknown-none` and leave its object in `OUT_DIR`,
//! where the crate embeds it with `include_bytes_aligned!`.
//!
//! The eBPF target is tier 3: `core` must be built from source (`-Z build-std=core`). rustup's
//! toolchains here have no `rust-src`, so the object is built by the Debian compiler
//! (`rustc-web` + `rust-web-src`), linked into rustup as the toolchain `debian`, with
//! `RUSTC_BOOTSTRAP=1` to allow `-Z` on a stable compiler. The rest of the workspace keeps
//! building with the normal toolchain. `cargo xtask setup` installs all of it.
//!
//! `AYA_BUILD_SKIP=1` leaves an empty object instead (a build without the tool chain); the
//! loaders report that the program was left out.

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

/// The rustup toolchain that builds the eBPF crates (`rustup toolchain link debian /usr`).
const EBPF_TOOLCHAIN: &str = "debian";
const SETUP_HINT: &str = "run `cargo xtask setup` (or `cargo xtask test`) to install the eBPF tool chain, \
     or set AYA_BUILD_SKIP=1 to build without the eBPF programs";

/// Builds the eBPF package `package` (at `root_dir`, whose binary targets are named `objects`)
/// into `OUT_DIR/<object>` each; on failure prints the problem as a cargo error and exits.
pub fn build_or_exit(package: &str, root_dir: &Path, objects: &[&str]) {
    if let Err(problem) = build(package, root_dir, objects) {
        // `cargo::error` makes cargo print the message as a top-level error, not buried in the
        // build script's stderr.
        for line in problem.lines() {
            println!("cargo::error={line}");
        }
        std::process::exit(1);
    }
}

fn build(package: &str, root_dir: &Path, objects: &[&str]) -> Result<(), String> {
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").ok_or("OUT_DIR not set")?);

    println!("cargo::rerun-if-env-changed=AYA_BUILD_SKIP");
    if env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true")) {
        // An empty object: the crate builds and runs; its loader reports that the program was
        // left out of this build.
        println!(
            "cargo::warning=AYA_BUILD_SKIP is set: {package} is built without its eBPF program"
        );
        for name in objects {
            let object = out_dir.join(name);
            std::fs::write(&object, [])
                .map_err(|e| format!("writing {}: {e}", object.display()))?;
        }
        return Ok(());
    }

    check_toolchain()?;

    // Inherited by the `cargo build` that aya-build spawns: lets the Debian compiler, a stable
    // release, accept `-Z build-std=core`. Only that child sees it; the crate being built and
    // its dependencies are compiled by cargo's own rustc invocations, which do not inherit it.
    // SAFETY: the build script is single-threaded at this point.
    unsafe { env::set_var("RUSTC_BOOTSTRAP", "1") };
    // aya-build turns every line the child cargo prints on stderr into a `cargo::warning`;
    // keep its progress lines out of every build's output. Compiler errors still come through
    // (as JSON on stdout). `--verbose` and `--quiet` conflict, so respect a verbose request.
    if env::var_os("CARGO_TERM_VERBOSE").is_none() {
        // SAFETY: as above.
        unsafe { env::set_var("CARGO_TERM_QUIET", "true") };
    }

    let root_dir = root_dir.to_str().ok_or("the workspace path is not UTF-8")?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: package,
            root_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(EBPF_TOOLCHAIN),
    )
    .map_err(|e| format!("building the eBPF program {package} failed: {e:#}"))?;

    for name in objects {
        let object = out_dir.join(name);
        if !object.is_file() {
            return Err(format!(
                "aya-build finished but left no {}; does {package} still have a binary target named {name}?",
                object.display()
            ));
        }
    }
    Ok(())
}

/// Fails with the command that fixes it when a piece of the eBPF tool chain is missing, rather
/// than with whatever rustup or the linker would say.
fn check_toolchain() -> Result<(), String> {
    let toolchain_ok = Command::new("rustup")
        .args(["run", EBPF_TOOLCHAIN, "rustc", "--version"])
        .output()
        .is_ok_and(|out| out.status.success());
    if !toolchain_ok {
        return Err(format!(
            "the rustup toolchain `{EBPF_TOOLCHAIN}` (Debian's rustc-web, which has the `core` \
             source the eBPF target needs) is not available.\n{SETUP_HINT}"
        ));
    }
    let src = Path::new("/usr/lib/rustlib/src/rust/library/core");
    if !src.is_dir() {
        return Err(format!(
            "{} is missing (Debian package rust-web-src).\n{SETUP_HINT}",
            src.display()
        ));
    }
    match find_tool("bpf-linker") {
        Some(linker) => {
            // A different bpf-linker (or LLVM) can produce a different object.
            println!("cargo::rerun-if-changed={}", linker.display());
            Ok(())
        }
        None => Err(format!(
            "bpf-linker is not on PATH nor in $CARGO_HOME/bin.\n{SETUP_HINT}"
        )),
    }
}

/// Where `cargo install` puts binaries: `$CARGO_HOME/bin`, by default `~/.cargo/bin`.
fn cargo_bin_dir() -> Option<PathBuf> {
    env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|home| PathBuf::from(home).join(".cargo")))
        .map(|home| home.join("bin"))
}

/// Finds `program` on `PATH`, or else in the cargo bin directory, which is then put on the
/// `PATH` that the eBPF build inherits (rustc looks the linker up there).
fn find_tool(program: &str) -> Option<PathBuf> {
    let path = env::var_os("PATH").unwrap_or_default();
    if let Some(found) = env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
    {
        return Some(found);
    }
    let bin = cargo_bin_dir()?;
    let found = bin.join(program);
    if !found.is_file() {
        return None;
    }
    let dirs = std::iter::once(bin).chain(env::split_paths(&path));
    let joined = env::join_paths(dirs).ok()?;
    // SAFETY: the build script is single-threaded at this point.
    unsafe { env::set_var("PATH", joined) };
    Some(found)
}
