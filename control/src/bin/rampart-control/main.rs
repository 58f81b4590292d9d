//! `rampart-control`: the control service's binary. It reads one TOML file, checks it
//! (including the TLS files and the database) and serves until SIGINT or SIGTERM.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

use control::Config;

mod call;

#[derive(Parser)]
#[command(
    name = "rampart-control",
    version,
    about = "Rampart's control service (gRPC over mutual TLS)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the control API.
    Serve {
        /// The configuration file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Check a configuration file and the TLS files it names, then exit.
    CheckConfig {
        /// The configuration file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Print the development configuration (the one `cargo xtask certs` writes).
    PrintDevelopmentConfig,
    /// Call an RPC of the control API over mutual TLS: the request is JSON (the proto3 JSON
    /// mapping), the response is printed as JSON with every field. A failed RPC prints
    /// {"error":{"code":..,"message":..}} on standard error and exits with status 1.
    Call {
        /// The client file: the control endpoint, its CA, and this client's certificate and
        /// key, which decide its role (`cargo xtask certs` writes front-end-client.toml and
        /// operator-client.toml).
        #[arg(long, short, env = "RAMPART_CONTROL_CLIENT")]
        client: PathBuf,
        /// The RPC: Service/Method, or the method alone (`rampart-control rpcs` lists them).
        rpc: String,
        /// The request as JSON (default {}); `-` reads it from standard input. RPCs that
        /// stream requests read one JSON object per line of standard input when this is
        /// absent or `-`, and print one JSON object per line as responses arrive.
        request: Option<String>,
        /// Seconds to wait for the answer (0: no limit). Default: 10 for one-shot RPCs,
        /// no limit for streams.
        #[arg(long)]
        timeout: Option<u64>,
    },
    /// List every RPC with its request and response types and an example request (JSON).
    Rpcs,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();
    match run(Cli::parse().command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("rampart-control: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> Result<()> {
    match command {
        Command::PrintDevelopmentConfig => {
            print!("{}", control::config::DEVELOPMENT);
            Ok(())
        }
        Command::CheckConfig { config } => {
            let config = load(&config)?;
            config.tls.load().context("checking the TLS files")?;
            println!(
                "configuration OK: listen {}, database {}",
                config.listen,
                config.database.display()
            );
            Ok(())
        }
        Command::Rpcs => {
            let rpcs: Vec<_> = control::call::methods()?
                .iter()
                .map(|method| {
                    serde_json::json!({
                        "rpc": control::call::display_name(method),
                        "request": method.input().full_name(),
                        "response": method.output().full_name(),
                        "clientStreaming": method.is_client_streaming(),
                        "serverStreaming": method.is_server_streaming(),
                        "exampleRequest": control::call::to_json(
                            &prost_reflect::DynamicMessage::new(method.input())
                        ),
                    })
                })
                .collect();
            println!("{}", serde_json::to_string_pretty(&rpcs)?);
            Ok(())
        }
        Command::Call {
            client,
            rpc,
            request,
            timeout,
        } => {
            let method = control::call::find(&rpc)?;
            let link = control::client::LinkFile::load(&client)
                .with_context(|| format!("client file {}", client.display()))?;
            let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
            runtime.block_on(call::run(link, method, request, timeout))
        }
        Command::Serve { config } => {
            let config = load(&config)?;
            let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
            runtime.block_on(serve(config))
        }
    }
}

fn load(path: &std::path::Path) -> Result<Config> {
    Config::load(path).with_context(|| format!("loading {}", path.display()))
}

async fn serve(config: Config) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    let shutdown = CancellationToken::new();
    let signal = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("signal received; stopping");
        signal.cancel();
    });
    control::serve(config, listener, shutdown).await?;
    Ok(())
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut terminate) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = terminate.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
