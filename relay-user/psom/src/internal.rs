//! The internal side of the Web Conferencing Edge, for a conferencing server to embed: it
//! dials the edge's internal port (the edge never connects inwards), keeps a pool of idle
//! mutual-TLS connections there, and hands each participant the edge assigns to a handler.
//!
//! The pool: `initial` connections at start; every connection that gets a participant is
//! replaced at once, so the pool never drains; each `Need` from the edge dials that many more;
//! a connection lost while idle (the edge restarted) is redialled with backoff.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::frame::{Assign, Frame, FrameError, HEADER_LEN};

/// The longest banner the edge may send before TLS.
const MAX_BANNER: usize = 512;
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// A participant's connection, after the Assign frame: raw bytes both ways.
pub type Session = TlsStream<TcpStream>;

#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("the edge sent no banner line before TLS")]
    Banner,
    #[error("bad frame from the edge: {0}")]
    Frame(#[from] FrameError),
    #[error("unexpected frame from the edge: {0:?}")]
    Unexpected(Box<Frame>),
}

/// Where the edge's internal port is and how to talk to it.
#[derive(Clone)]
pub struct EdgeLink {
    pub address: SocketAddr,
    /// The name the edge's internal certificate carries.
    pub server_name: ServerName<'static>,
    /// TLS 1.3 with this server's client certificate.
    pub tls: Arc<rustls::ClientConfig>,
    /// This server's name, sent in Hello (for the edge's logs).
    pub name: String,
}

/// Reads one frame (exactly its bytes: what follows belongs to the participant).
pub async fn read_frame<S: tokio::io::AsyncRead + Unpin>(
    stream: &mut S,
) -> Result<Frame, StreamError> {
    let mut header = [0u8; HEADER_LEN];
    stream.read_exact(&mut header).await?;
    let len = usize::from(u16::from_be_bytes([header[2], header[3]]));
    let mut frame = header.to_vec();
    frame.resize(HEADER_LEN + len, 0);
    stream.read_exact(&mut frame[HEADER_LEN..]).await?;
    match Frame::decode(&frame)? {
        Some((frame, _)) => Ok(frame),
        None => Err(StreamError::Frame(FrameError::Malformed("truncated"))),
    }
}

/// Dials the edge until `shutdown`, handing each assigned participant to `handler`.
pub async fn run<H, F>(link: EdgeLink, initial: usize, handler: H, shutdown: CancellationToken)
where
    H: Fn(Assign, Session) -> F + Send + Sync + 'static,
    F: Future<Output = ()> + Send + 'static,
{
    let handler = Arc::new(handler);
    let (dial_tx, mut dial_rx) = mpsc::unbounded_channel::<Duration>();
    for _ in 0..initial.max(1) {
        let _ = dial_tx.send(Duration::ZERO);
    }
    loop {
        let delay = tokio::select! {
            () = shutdown.cancelled() => return,
            delay = dial_rx.recv() => match delay {
                Some(delay) => delay,
                None => return,
            },
        };
        let (link, handler, dial_tx, shutdown) = (
            link.clone(),
            handler.clone(),
            dial_tx.clone(),
            shutdown.clone(),
        );
        tokio::spawn(async move {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(delay) => {}
            }
            let outcome = tokio::select! {
                () = shutdown.cancelled() => return,
                outcome = idle_connection(&link, &dial_tx) => outcome,
            };
            match outcome {
                Ok((assign, session)) => {
                    // Keep the pool full: this connection now carries a participant.
                    let _ = dial_tx.send(Duration::ZERO);
                    handler(assign, session).await;
                }
                Err(error) => {
                    let next = (delay * 2).clamp(BACKOFF_MIN, BACKOFF_MAX);
                    debug!(edge = %link.address, %error, retry_in = ?next, "edge connection lost");
                    let _ = dial_tx.send(next);
                }
            }
        });
    }
}

/// One pooled connection: dial, banner, TLS, Hello; then wait for Need (dial more) or Assign.
async fn idle_connection(
    link: &EdgeLink,
    dial: &mpsc::UnboundedSender<Duration>,
) -> Result<(Assign, Session), StreamError> {
    let mut tcp = TcpStream::connect(link.address).await?;
    tcp.set_nodelay(true)?;
    let banner = read_banner(&mut tcp).await?;
    debug!(edge = %link.address, banner = banner.trim_end(), "edge banner");
    let mut tls = TlsConnector::from(link.tls.clone())
        .connect(link.server_name.clone(), tcp)
        .await?;
    tls.write_all(
        &Frame::Hello {
            server: link.name.clone(),
        }
        .encode(),
    )
    .await?;
    loop {
        match read_frame(&mut tls).await? {
            Frame::Need { connections } => {
                info!(edge = %link.address, connections, "the edge asks for more connections");
                for _ in 0..connections {
                    let _ = dial.send(Duration::ZERO);
                }
            }
            Frame::Assign(assign) => return Ok((assign, tls)),
            other => {
                warn!(edge = %link.address, frame = ?other, "unexpected frame from the edge");
                return Err(StreamError::Unexpected(Box::new(other)));
            }
        }
    }
}

/// The text line the edge sends on its internal port before the TLS handshake.
async fn read_banner(tcp: &mut TcpStream) -> Result<String, StreamError> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.len() < MAX_BANNER {
        tcp.read_exact(&mut byte).await?;
        line.push(byte[0]);
        if byte[0] == b'\n' {
            return Ok(String::from_utf8_lossy(&line).into_owned());
        }
    }
    Err(StreamError::Banner)
}

/// A TLS 1.3 client configuration from PEM files: the CA the edge's internal certificate
/// chains to, and this server's certificate and key.
pub fn client_tls(
    ca: &std::path::Path,
    certificate: &std::path::Path,
    private_key: &std::path::Path,
) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    use anyhow::Context as _;
    let read = |path: &std::path::Path| {
        std::fs::read(path).with_context(|| format!("reading {}", path.display()))
    };
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut read(ca)?.as_slice()) {
        roots.add(cert.with_context(|| format!("{}: not PEM", ca.display()))?)?;
    }
    let chain = rustls_pemfile::certs(&mut read(certificate)?.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{}: not PEM certificates", certificate.display()))?;
    let key = rustls_pemfile::private_key(&mut read(private_key)?.as_slice())?
        .with_context(|| format!("{}: no PEM private key", private_key.display()))?;
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])?
    .with_root_certificates(roots)
    .with_client_auth_cert(chain, key)?;
    Ok(Arc::new(config))
}
