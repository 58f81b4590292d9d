//! The client side of the control API's mutual TLS, for Rust callers (agents, the
//! `rampart-control call` tool, tests): a [`Link`] says where the control service is and
//! which certificates to use; [`Link::connect`] gives a tonic [`Channel`] whose every
//! connection is a TLS 1.3 handshake presenting our certificate and checking the server's
//! against the given CA.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls::RootCertStore;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde::Deserialize;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tonic::transport::{Channel, Endpoint};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("TLS: {0}")]
    Tls(#[from] rustls::Error),
    #[error("cannot resolve {0}")]
    Resolve(String),
    #[error("cannot connect: {0}")]
    Connect(#[from] tonic::transport::Error),
}

/// A bad setting of a [`Link`], named by its key (`endpoint`, `ca`, ...), so a configuration
/// file that embeds these keys can name its own section.
#[derive(Debug, thiserror::Error)]
#[error("`{key}`: {problem}")]
pub struct LinkError {
    pub key: &'static str,
    pub problem: String,
}

fn link_error(key: &'static str, problem: impl Into<String>) -> LinkError {
    LinkError {
        key,
        problem: problem.into(),
    }
}

/// A client configuration: TLS 1.3, ALPN h2, our certificate chain and key, and the CA(s) the
/// server's certificate must chain to.
pub fn client_config(
    roots: RootCertStore,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<Arc<rustls::ClientConfig>, ClientError> {
    let mut config = rustls::ClientConfig::builder_with_provider(crate::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// The keys of a client file (`cargo xtask certs` writes `front-end-client.toml` and
/// `operator-client.toml`); an agent's `[control]` section has the same keys and its own.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkFile {
    /// `host:port` or `https://host:port` of the control service.
    pub endpoint: String,
    /// The name its certificate carries, when not the endpoint's host.
    pub server_name: Option<String>,
    /// PEM files, relative to the file that names them.
    pub ca: PathBuf,
    pub certificate: PathBuf,
    pub private_key: PathBuf,
}

impl LinkFile {
    /// Reads a client file; its paths are relative to it.
    pub fn load(path: &Path) -> Result<Link, LinkError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| link_error("file", format!("cannot read {}: {e}", path.display())))?;
        let file: LinkFile = toml::from_str(&text)
            .map_err(|e| link_error("file", format!("{}: {e}", path.display())))?;
        file.resolve(path.parent().unwrap_or(Path::new(".")))
    }

    /// Checks every setting and reads the PEM files (relative to `base_dir`).
    pub fn resolve(&self, base_dir: &Path) -> Result<Link, LinkError> {
        let (host, port) = parse_endpoint(&self.endpoint)?;
        let server_name = self.server_name.as_deref().unwrap_or(&host);
        let server_name = ServerName::try_from(server_name.to_owned()).map_err(|_| {
            link_error(
                "server_name",
                format!(
                    "{server_name:?} is not a DNS name or IP; set the name the control service's certificate carries"
                ),
            )
        })?;
        let mut roots = RootCertStore::empty();
        for cert in pem_certificates("ca", &base_dir.join(&self.ca))? {
            roots.add(cert).map_err(|e| {
                link_error(
                    "ca",
                    format!("unusable CA certificate: {e}; use the control service's CA (PEM)"),
                )
            })?;
        }
        let chain = pem_certificates("certificate", &base_dir.join(&self.certificate))?;
        webpki::EndEntityCert::try_from(&chain[0]).map_err(|e| {
            link_error(
                "certificate",
                format!("unparsable certificate: {e}; use this client's certificate (PEM)"),
            )
        })?;
        let key_path = base_dir.join(&self.private_key);
        let key = rustls_pemfile::private_key(&mut read("private_key", &key_path)?.as_slice())
            .map_err(|e| link_error("private_key", format!("not a PEM private key: {e}")))?
            .ok_or_else(|| link_error("private_key", "the file holds no PEM private key"))?;
        let tls = client_config(roots, chain, key).map_err(|e| {
            link_error(
                "private_key",
                format!("does not fit `certificate` ({e}); use the key of that certificate"),
            )
        })?;
        Ok(Link {
            host,
            port,
            server_name,
            tls,
        })
    }
}

/// `host:port`, `[v6]:port` or `https://host:port/`; plain `http://` is refused, since the
/// control API is served over mutual TLS only.
fn parse_endpoint(endpoint: &str) -> Result<(String, u16), LinkError> {
    let endpoint = endpoint.trim();
    if endpoint.starts_with("http://") {
        return Err(link_error(
            "endpoint",
            "the control service is reached over mutual TLS only; use https://host:port or host:port",
        ));
    }
    let authority = endpoint
        .strip_prefix("https://")
        .unwrap_or(endpoint)
        .trim_end_matches('/');
    let bad = || {
        link_error(
            "endpoint",
            format!(
                "{endpoint:?} is not host:port; use e.g. \"https://control.example.org:50051\" or \"10.0.0.2:50051\""
            ),
        )
    };
    let (host, port) = authority.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().ok().filter(|p| *p != 0).ok_or_else(bad)?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() || host.contains(['/', ' ', '@']) {
        return Err(bad());
    }
    Ok((host.to_owned(), port))
}

fn read(key: &'static str, path: &Path) -> Result<Vec<u8>, LinkError> {
    std::fs::read(path).map_err(|e| link_error(key, format!("cannot read {}: {e}", path.display())))
}

/// The PEM certificates of the file of `key`: at least one.
fn pem_certificates(
    key: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, LinkError> {
    let certs: Vec<_> = rustls_pemfile::certs(&mut read(key, path)?.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|e| link_error(key, format!("not PEM certificates: {e}")))?;
    if certs.is_empty() {
        return Err(link_error(
            key,
            format!("{} holds no PEM certificate", path.display()),
        ));
    }
    Ok(certs)
}

/// Where the control service is and how to prove who we are to it.
#[derive(Clone)]
pub struct Link {
    /// Host name or IP (resolved at every [`Link::connect`]).
    pub host: String,
    pub port: u16,
    /// The name the control service's certificate must carry.
    pub server_name: ServerName<'static>,
    /// TLS 1.3 client configuration: our certificate and key, the CA to check control against.
    pub tls: Arc<rustls::ClientConfig>,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("endpoint", &self.endpoint())
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

impl Link {
    /// `host:port`, for logs and messages.
    pub fn endpoint(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// Resolves the host now and connects to its first address (see [`connect`]).
    pub async fn connect(&self) -> Result<Channel, ClientError> {
        let address = tokio::net::lookup_host((self.host.as_str(), self.port))
            .await
            .ok()
            .and_then(|mut addresses| addresses.next())
            .ok_or_else(|| ClientError::Resolve(self.endpoint()))?;
        connect(address, self.server_name.clone(), self.tls.clone()).await
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        let ok = |s: &str| parse_endpoint(s).unwrap();
        assert_eq!(
            ok("https://control.example.org:50051/"),
            ("control.example.org".into(), 50051)
        );
        assert_eq!(ok("10.0.0.2:7443"), ("10.0.0.2".into(), 7443));
        assert_eq!(ok("[::1]:7443"), ("::1".into(), 7443));
        for bad in ["http://c:1", "c", "c:0", "c:x", ":1", "a/b:1", "u@c:1"] {
            let error = parse_endpoint(bad).unwrap_err();
            assert_eq!(error.key, "endpoint", "{bad}");
        }
        assert!(
            parse_endpoint("http://c:1")
                .unwrap_err()
                .problem
                .contains("mutual TLS")
        );
    }

    #[test]
    fn a_missing_file_names_its_key_and_path() {
        let file = LinkFile {
            endpoint: "localhost:7443".into(),
            server_name: None,
            ca: "no-such-ca.pem".into(),
            certificate: "c.pem".into(),
            private_key: "c.key".into(),
        };
        let error = file.resolve(Path::new("/nonexistent")).unwrap_err();
        assert_eq!(error.key, "ca");
        assert!(
            error.problem.contains("/nonexistent/no-such-ca.pem"),
            "{error}"
        );
    }
}
