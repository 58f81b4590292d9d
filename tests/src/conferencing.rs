//! The Web Conferencing Edge from both sides: participants (TLS clients that join with a
//! conference key) and the reference conferencing server, which dials the edge's internal
//! port with its client certificate. Certificates come from [`ControlPki`].

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context as _, bail};
use rampart_psom::frame::{Frame, Join};
use rampart_psom::internal::{self, EdgeLink};
use rampart_psom::reference::ConferenceServer;
use rustls::pki_types::ServerName;
use tokio::io::AsyncWriteExt as _;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_util::sync::CancellationToken;

use crate::control::ControlPki;
use crate::process::ConferencingConfig;

/// The name on the edge's internal certificate.
pub const EDGE_INTERNAL_NAME: &str = "edge.conferencing.rampart.test";
/// The SAN of the internal conferencing server's client certificate.
pub const CONFERENCE_SERVER_NAME: &str = "conference-server.rampart.test";

/// The agent's `[conferencing]` section with the PKI's certificates.
pub fn config(pki: &ControlPki, external: SocketAddr, internal: SocketAddr) -> ConferencingConfig {
    ConferencingConfig {
        external,
        internal,
        certificate: pki.dir.join("conferencing-edge.pem"),
        private_key: pki.dir.join("conferencing-edge.key"),
        internal_client_ca: pki.dir.join("ca.pem"),
        wait_for_server: 2,
    }
}

/// The reference server's link to the edge's internal port.
pub fn edge_link(pki: &ControlPki, internal: SocketAddr) -> anyhow::Result<EdgeLink> {
    Ok(EdgeLink {
        address: internal,
        server_name: ServerName::try_from(EDGE_INTERNAL_NAME)?,
        tls: internal::client_tls(
            &pki.dir.join("ca.pem"),
            &pki.dir.join("conference-server.pem"),
            &pki.dir.join("conference-server.key"),
        )?,
        name: "reference".into(),
    })
}

/// The reference server, dialling the edge on the current tokio runtime until cancelled.
pub fn start_reference_server(
    link: EdgeLink,
    pool: usize,
) -> (Arc<ConferenceServer>, CancellationToken) {
    let server = ConferenceServer::new();
    let shutdown = CancellationToken::new();
    let serving = server.clone();
    tokio::spawn(internal::run(
        link,
        pool,
        move |assign, session| serving.clone().serve(assign, session),
        shutdown.clone(),
    ));
    (server, shutdown)
}

/// A participant's answer: admitted (with the stream, bytes from now on) or a frame that
/// refused it.
pub enum Joined {
    Accepted(Box<TlsStream<TcpStream>>),
    Refused(Frame),
}

/// Connects to the edge's external port over TLS (trusting the PKI's CA), sends `join`
/// and reads the answer.
pub async fn join(pki: &ControlPki, external: SocketAddr, join: Join) -> anyhow::Result<Joined> {
    let mut roots = rustls::RootCertStore::empty();
    let ca = std::fs::read(pki.dir.join("ca.pem"))?;
    for cert in rustls_pemfile::certs(&mut ca.as_slice()) {
        roots.add(cert?)?;
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = TcpStream::connect(external)
        .await
        .with_context(|| format!("connecting to {external}"))?;
    let mut tls = TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from(crate::certs::SERVER_NAME)?, tcp)
        .await?;
    tls.write_all(&Frame::Join(join).encode()).await?;
    match internal::read_frame(&mut tls).await? {
        Frame::Accept => Ok(Joined::Accepted(Box::new(tls))),
        refused @ Frame::Reject { .. } => Ok(Joined::Refused(refused)),
        other => bail!("unexpected answer to a join: {other:?}"),
    }
}

/// A join request.
pub fn request(conference: &str, key: &[u8], anonymous: bool) -> Join {
    Join {
        conference_id: conference.into(),
        key: key.to_vec(),
        anonymous,
        display_name: if anonymous { "Guest" } else { "Alice" }.into(),
    }
}
