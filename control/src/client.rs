//! The client side of the control API's mutual TLS, for Rust callers (agents, tools, tests):
//! a tonic [`Channel`] whose every connection is a TLS 1.3 handshake presenting our
//! certificate and checking the server's against the given CA.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls::RootCertStore;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tonic::transport::{Channel, Endpoint};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {problem}")]
    Invalid { path: String, problem: String },
    #[error("TLS: {0}")]
    Tls(#[from] rustls::Error),
    #[error("cannot connect: {0}")]
    Connect(#[from] tonic::transport::Error),
}

/// A client configuration: TLS 1.3, ALPN h2, our certificate chain and key, and the CA(s) the
/// server's certificate must chain to.
pub fn client_config(
    roots: RootCertStore,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<Arc<rustls::ClientConfig>, ClientError> {
    let mut config = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// [`client_config`] from PEM files.
pub fn client_config_from_files(
    ca: &Path,
    certificate: &Path,
    private_key: &Path,
) -> Result<Arc<rustls::ClientConfig>, ClientError> {
    let read = |path: &Path| {
        std::fs::read(path).map_err(|source| ClientError::Read {
            path: path.display().to_string(),
            source,
        })
    };
    let bad = |path: &Path, problem: String| ClientError::Invalid {
        path: path.display().to_string(),
        problem,
    };
    let mut roots = RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut read(ca)?.as_slice()) {
        let cert = cert.map_err(|e| bad(ca, e.to_string()))?;
        roots.add(cert).map_err(|e| bad(ca, e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(bad(ca, "no PEM certificate".into()));
    }
    let chain = rustls_pemfile::certs(&mut read(certificate)?.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(certificate, e.to_string()))?;
    if chain.is_empty() {
        return Err(bad(certificate, "no PEM certificate".into()));
    }
    let key = rustls_pemfile::private_key(&mut read(private_key)?.as_slice())
        .map_err(|e| bad(private_key, e.to_string()))?
        .ok_or_else(|| bad(private_key, "no PEM private key".into()))?;
    client_config(roots, chain, key)
}

/// A channel to the control service at `address`, checking that its certificate is valid
/// for `server_name`. Connects now, so an unreachable or untrusted server is an error here;
/// later connection failures make RPCs fail and the channel reconnect.
pub async fn connect(
    address: SocketAddr,
    server_name: ServerName<'static>,
    config: Arc<rustls::ClientConfig>,
) -> Result<Channel, ClientError> {
    let connector = TlsConnector::from(config);
    // The URI only satisfies the HTTP/2 layer (the :authority of requests); the connector
    // below decides where and how to connect.
    // HTTP/2 pings find a control service that vanished without closing the connection (a
    // partition, a dead host) within 40 s, where TCP alone could take many minutes.
    let endpoint = Endpoint::from_shared(format!("http://{address}"))?
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true);
    let channel = endpoint
        .connect_with_connector(tower::service_fn(move |_uri| {
            let connector = connector.clone();
            let server_name = server_name.clone();
            async move {
                let tcp = TcpStream::connect(address).await?;
                tcp.set_nodelay(true)?;
                let tls = connector.connect(server_name, tcp).await?;
                Ok::<_, std::io::Error>(TokioIo::new(tls))
            }
        }))
        .await?;
    Ok(channel)
}
