//! `rampart-conference-server`: the reference internal conferencing server. It dials the Web
//! Conferencing Edge's internal port (mutual TLS), keeps a pool of connections there, and
//! serves the participants the edge assigns (shared-state broadcast per conference).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context as _, Result};
use clap::Parser;
use rampart_psom::internal::{self, EdgeLink};
use rampart_psom::reference::ConferenceServer;
use rustls::pki_types::ServerName;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "rampart-conference-server",
    about = "Reference internal conferencing server for Rampart's Web Conferencing Edge"
)]
struct Cli {
    /// The edge's internal port (e.g. 10.0.0.5:8057).
    #[arg(long)]
    edge: SocketAddr,
    /// The name the edge's internal certificate carries.
    #[arg(long)]
    server_name: String,
    /// PEM: the CA of the edge's certificate, this server's certificate and key.
    #[arg(long)]
    ca: PathBuf,
    #[arg(long)]
    certificate: PathBuf,
    #[arg(long)]
    private_key: PathBuf,
    /// Idle connections to keep at the edge.
    #[arg(long, default_value_t = 4)]
    pool: usize,
    /// This server's name, for the edge's logs.
    #[arg(long, default_value = "rampart-conference-server")]
    name: String,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("rampart-conference-server: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    let link = EdgeLink {
        address: cli.edge,
        server_name: ServerName::try_from(cli.server_name.clone())
            .with_context(|| format!("{:?} is not a DNS name or IP", cli.server_name))?,
        tls: internal::client_tls(&cli.ca, &cli.certificate, &cli.private_key)?,
        name: cli.name,
    };
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let server = ConferenceServer::new();
        let shutdown = CancellationToken::new();
        let on_signal = shutdown.clone();
        tokio::spawn(async move {
            let _ = tokio::signal::ctrl_c().await;
            on_signal.cancel();
        });
        tracing::info!(edge = %link.address, pool = cli.pool, "dialling the edge");
        internal::run(
            link,
            cli.pool,
            move |assign, session| server.clone().serve(assign, session),
            shutdown,
        )
        .await;
    });
    Ok(())
}
