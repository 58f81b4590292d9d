//! `rampart`: the edge agent.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use rampart::config::{Config, EMBEDDED_DEFAULT};
use rampart::server::Edge;
use rampart_turn::Transport;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};
use tracing_subscriber::EnvFilter;

/// Rampart edge agent: STUN/TURN relay for an enterprise communications perimeter.
#[derive(Parser, Debug)]
#[command(version)]
struct Cli {
    /// Configuration file (TOML). Without it, the embedded all-in-one loopback default is used.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Validate the configuration, report what is wrong, and exit.
    #[arg(long)]
    check_config: bool,
    /// Print the embedded default configuration (a commented starting point) and exit.
    #[arg(long)]
    print_default_config: bool,
    /// Seconds between two `counters` log lines (JSON; logged only when something changed).
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    stats_interval: u64,
    /// Log filter when RUST_LOG is unset (e.g. `info`, `debug`, `rampart=debug`).
    #[arg(long, default_value = "info")]
    log: String,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&cli.log));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    if cli.print_default_config {
        print!("{EMBEDDED_DEFAULT}");
        return ExitCode::SUCCESS;
    }
    let config = match &cli.config {
        Some(path) => {
            Config::load(path).with_context(|| format!("configuration {}", path.display()))
        }
        None => Config::embedded_default().context("embedded default configuration"),
    };
    let config = match config {
        Ok(config) => config,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(2);
        }
    };
    if cli.check_config {
        println!("configuration OK");
        return ExitCode::SUCCESS;
    }
    raise_open_files_limit(config.turn.allocations_total);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .on_thread_start(yield_to_relay_loops)
        .build();
    let runtime = match runtime {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let stats_every = std::time::Duration::from_secs(cli.stats_interval);
    match runtime.block_on(serve(config, cli.config.is_none(), stats_every)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e:#}");
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Every relay is a socket (two for a dual-stack allocation), and shells start processes with
/// 1024 open files: raise the soft limit to the hard one, and say when even that cannot hold
/// `limits.allocations_total` (allocations past it would fail with 508).
fn raise_open_files_limit(allocations_total: usize) {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return;
    };
    if soft < hard {
        match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => info!(from = soft, to = hard, "open files limit raised"),
            Err(error) => warn!(soft, hard, %error, "cannot raise the open files limit"),
        }
    }
    // Listeners, TCP clients and the control link need some too.
    let needed = u64::try_from(allocations_total)
        .unwrap_or(u64::MAX)
        .saturating_add(1024);
    if hard < needed {
        warn!(
            limit = hard,
            allocations_total,
            "the open files limit is below limits.allocations_total + 1024: allocations past \
             it fail with 508; raise LimitNOFILE (systemd) or `ulimit -Hn`"
        );
    }
}

async fn serve(
    config: Config,
    embedded: bool,
    stats_every: std::time::Duration,
) -> anyhow::Result<()> {
    let realm = config.turn.realm.clone();
    let users = config.static_users.clone();
    let edge = Edge::start(config, stats_every).await?;
    println!("Rampart edge is up (realm {realm}). Reach it at:");
    for (transport, address) in edge.local_addresses() {
        let scheme = if *transport == Transport::Tls {
            "turns"
        } else {
            "turn"
        };
        let proto = if *transport == Transport::Udp {
            "udp"
        } else {
            "tcp"
        };
        println!("  {scheme}:{address}?transport={proto}");
    }
    if embedded {
        println!(
            "Test credential (embedded default configuration): user `demo`, password `rampart-demo`"
        );
        println!("  e.g.  turnutils_uclient -u demo -w rampart-demo -y 127.0.0.1");
    } else if !users.is_empty() {
        println!("Static users: {}", users.join(", "));
    }
    let shutdown = CancellationToken::new();
    let on_signal = shutdown.clone();
    tokio::spawn(async move {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
        }
        info!("signal received");
        on_signal.cancel();
    });
    edge.run(shutdown).await;
    Ok(())
}

/// Nice value of the tokio side's threads (TCP/TLS clients, control reports, conferencing,
/// SIP): they yield to the relay loops, which keep the default. A status report that lists
/// thousands of allocations then waits for the datagrams instead of delaying them when both
/// share a CPU. Lowering a thread's own priority needs no privilege.
const RUNTIME_NICE: libc::c_int = 10;

fn yield_to_relay_loops() {
    // SAFETY: setpriority on the calling thread (who = 0; Linux priorities are per thread).
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, RUNTIME_NICE) };
    if rc != 0 {
        tracing::debug!(
            error = %std::io::Error::last_os_error(),
            "cannot lower a runtime thread's priority"
        );
    }
}
