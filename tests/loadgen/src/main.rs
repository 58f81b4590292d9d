//! `rampart-loadgen`: the side-by-side load test (`suite`, what `cargo xtask loadtest` runs).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

use rampart_loadgen::suite::{self, Generator, Profile};
use rampart_loadgen::systems::System;

#[derive(Parser)]
#[command(
    name = "rampart-loadgen",
    about = "Rampart's TURN load generator and load test"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the same workload against each system in network namespaces (needs root) and
    /// print the side-by-side table; write report.json and report.svg.
    Suite {
        /// tiny (seconds: proves the harness works), quick (under 5 minutes) or full.
        #[arg(long, default_value = "quick")]
        profile: String,
        /// Where the media comes from: injector (in the kernel, BPF_PROG_RUN live frames) or
        /// sockets (a system call per packet; what a peer's tools would do).
        #[arg(long, default_value = "injector")]
        generator: String,
        /// Which systems, comma-separated: rampart-xdp, rampart-userspace, rampart-userspace-epoll,
        /// coturn.
        #[arg(
            long,
            default_value = "rampart-xdp,rampart-userspace,rampart-userspace-epoll,coturn"
        )]
        systems: String,
        /// Media payload bytes per packet (default: the profile's, 160: audio-like).
        #[arg(long)]
        size: Option<usize>,
        /// Packets per flow and direction sent back to back (default 1; 8-16: video-like).
        #[arg(long)]
        burst: Option<usize>,
        /// Flows (allocations carrying media); default: the profile's.
        #[arg(long)]
        flows: Option<usize>,
        /// Where report.json (every step), loadtest.json (the headline numbers), report.svg and
        /// report.md go.
        #[arg(long, default_value = "target/loadtest")]
        out: PathBuf,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse().command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("rampart-loadgen: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> Result<()> {
    match command {
        Command::Suite {
            profile,
            generator,
            systems,
            size,
            burst,
            flows,
            out,
        } => {
            let Some(mut profile) = Profile::named(&profile) else {
                bail!("no profile {profile:?}: tiny, quick or full");
            };
            profile.generator = Generator::parse(&generator)
                .with_context(|| format!("no generator {generator:?}: injector or sockets"))?;
            if let Some(size) = size {
                profile.workload.size = size;
            }
            if let Some(burst) = burst {
                profile.workload.burst = burst;
            }
            if let Some(flows) = flows {
                profile.flows = flows;
            }
            let systems = systems
                .split(',')
                .map(|name| {
                    System::parse(name.trim()).with_context(|| {
                        format!(
                            "no system {name:?}: rampart-xdp, rampart-userspace, \
                             rampart-userspace-epoll, coturn"
                        )
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            let report = suite::run(&profile, &systems)?;
            std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
            let table = report.table();
            std::fs::write(
                out.join("report.json"),
                serde_json::to_string_pretty(&report)?,
            )?;
            std::fs::write(out.join("report.svg"), report.svg())?;
            std::fs::write(
                out.join("loadtest.json"),
                serde_json::to_string_pretty(&report.summary())? + "\n",
            )?;
            std::fs::write(out.join("report.md"), &table)?;
            println!(
                "\nRampart load test, profile {}, {} generator: {} flows, {} bytes, burst {}, {:.0} s on {} CPUs ({}, Linux {})\n",
                report.profile,
                report.generator.name(),
                report.flows,
                report.packet_size,
                report.burst,
                report.seconds,
                report.machine.cpus,
                report.machine.cpu_model,
                report.machine.kernel
            );
            println!("{table}");
            println!(
                "written: {}/report.json, loadtest.json, report.svg, report.md",
                out.display()
            );
            Ok(())
        }
    }
}
