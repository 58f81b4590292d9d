//! The server side of mutual TLS: TLS 1.3 only, a client certificate required and verified
//! against the configured CA (and CRLs), and the whole configuration rebuilt when any of its
//! files changes.
//!
//! Why TLS 1.3 only: every caller is ours (front-ends, agents, operators' tools), so there is
//! no legacy client to serve, and 1.3 encrypts the client certificate, which names the node.
//!
//! Why reload by polling file contents rather than inotify: certificate rotation tools
//! replace files by rename, by symlink swap (Kubernetes secrets) or by rewriting in place,
//! and a content hash sees all three. A change is applied only if the new files build a
//! working configuration (key matches certificate, certificate names the server), so a
//! rotation caught half-way (new certificate, old key) keeps the old configuration until the
//! key arrives. Connections already established keep the configuration they started with;
//! new ones get the new one, so nothing is dropped.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::RootCertStore;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// The TLS files of the configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM: the server certificate, then its intermediates.
    pub certificate: PathBuf,
    /// PEM: the server's private key (PKCS#8, PKCS#1 or SEC1).
    pub private_key: PathBuf,
    /// PEM: the CA certificates client certificates must chain to.
    pub client_ca: PathBuf,
    /// PEM: certificate revocation lists of the client CA(s).
    pub crls: Vec<PathBuf>,
    /// The name clients connect to; the server certificate must be valid for it.
    pub server_name: ServerName<'static>,
}

/// Why the TLS files do not make a working configuration. Each variant names the
/// configuration key of the file at fault.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("`{key}` ({}): cannot read: {source}", path.display())]
    Read {
        key: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("`{key}` ({}): {problem}", path.display())]
    Invalid {
        key: &'static str,
        path: PathBuf,
        problem: String,
    },
    #[error("`tls`: {0}")]
    Rustls(String),
}

/// A server configuration and the fingerprint of the file contents it was built from.
pub struct LoadedTls {
    pub config: Arc<rustls::ServerConfig>,
    fingerprint: [u8; 32],
}

/// The file contents, read once so the fingerprint and the configuration describe the same
/// bytes even if a file changes while we read.
struct Contents {
    certificate: Vec<u8>,
    private_key: Vec<u8>,
    client_ca: Vec<u8>,
    crls: Vec<(PathBuf, Vec<u8>)>,
}

impl Contents {
    fn fingerprint(&self) -> [u8; 32] {
        let mut hash = Sha256::new();
        for part in [&self.certificate, &self.private_key, &self.client_ca]
            .into_iter()
            .chain(self.crls.iter().map(|(_, crl)| crl))
        {
            // Length-prefixed, so moving bytes from one file to the next changes the hash.
            hash.update((part.len() as u64).to_be_bytes());
            hash.update(part);
        }
        hash.finalize().into()
    }
}

pub use control_link::provider;

impl TlsFiles {
    fn read(&self) -> Result<Contents, TlsError> {
        let read = |key: &'static str, path: &Path| {
            std::fs::read(path).map_err(|source| TlsError::Read {
                key,
                path: path.to_owned(),
                source,
            })
        };
        Ok(Contents {
            certificate: read("tls.certificate", &self.certificate)?,
            private_key: read("tls.private_key", &self.private_key)?,
            client_ca: read("tls.client_ca", &self.client_ca)?,
            crls: self
                .crls
                .iter()
                .map(|path| Ok((path.clone(), read("tls.crls", path)?)))
                .collect::<Result<_, TlsError>>()?,
        })
    }

    /// Reads the files and builds the server configuration, checking everything a
    /// misconfiguration could get wrong before a client finds out.
    pub fn load(&self) -> Result<LoadedTls, TlsError> {
        let contents = self.read()?;
        let config = self.build(&contents)?;
        Ok(LoadedTls {
            config,
            fingerprint: contents.fingerprint(),
        })
    }

    fn build(&self, contents: &Contents) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let invalid = |key: &'static str, path: &Path, problem: String| TlsError::Invalid {
            key,
            path: path.to_owned(),
            problem,
        };

        let chain: Vec<CertificateDer<'static>> =
            rustls_pemfile::certs(&mut contents.certificate.as_slice())
                .collect::<Result<_, _>>()
                .map_err(|e| invalid("tls.certificate", &self.certificate, e.to_string()))?;
        let Some(leaf) = chain.first() else {
            return Err(invalid(
                "tls.certificate",
                &self.certificate,
                "no PEM certificate in the file".into(),
            ));
        };
        let end_entity = webpki::EndEntityCert::try_from(leaf).map_err(|e| {
            invalid(
                "tls.certificate",
                &self.certificate,
                format!("cannot parse the certificate: {e}"),
            )
        })?;
        end_entity
            .verify_is_valid_for_subject_name(&self.server_name)
            .map_err(|_| {
                invalid(
                    "tls.certificate",
                    &self.certificate,
                    format!(
                        "the certificate is not valid for tls.server_name {:?}: clients \
                         checking the name would refuse it; issue it with that name as a SAN \
                         or fix tls.server_name",
                        self.server_name.to_str()
                    ),
                )
            })?;

        let key: PrivateKeyDer<'static> =
            rustls_pemfile::private_key(&mut contents.private_key.as_slice())
                .map_err(|e| invalid("tls.private_key", &self.private_key, e.to_string()))?
                .ok_or_else(|| {
                    invalid(
                        "tls.private_key",
                        &self.private_key,
                        "no PEM private key in the file".into(),
                    )
                })?;

        let mut roots = RootCertStore::empty();
        for ca in rustls_pemfile::certs(&mut contents.client_ca.as_slice()) {
            let ca = ca.map_err(|e| invalid("tls.client_ca", &self.client_ca, e.to_string()))?;
            roots.add(ca).map_err(|e| {
                invalid(
                    "tls.client_ca",
                    &self.client_ca,
                    format!("not a usable CA certificate: {e}"),
                )
            })?;
        }
        if roots.is_empty() {
            return Err(invalid(
                "tls.client_ca",
                &self.client_ca,
                "no PEM certificate in the file: without a CA no client could be verified".into(),
            ));
        }

        let mut crls: Vec<CertificateRevocationListDer<'static>> = Vec::new();
        for (path, crl) in &contents.crls {
            let before = crls.len();
            for item in rustls_pemfile::crls(&mut crl.as_slice()) {
                crls.push(item.map_err(|e| invalid("tls.crls", path, e.to_string()))?);
            }
            if crls.len() == before {
                return Err(invalid(
                    "tls.crls",
                    path,
                    "no PEM CRL (-----BEGIN X509 CRL-----) in the file".into(),
                ));
            }
        }

        let provider = provider();
        // Defaults kept on purpose: client certificates are required (no
        // allow_unauthenticated), and with CRLs every certificate of the chain must have a
        // known revocation status, so a CRL file missing for an intermediate CA fails closed.
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .with_crls(crls)
                .build()
                .map_err(|e| invalid("tls.client_ca", &self.client_ca, e.to_string()))?;

        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Rustls(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .map_err(|e| {
                invalid(
                    "tls.private_key",
                    &self.private_key,
                    format!("does not fit the certificate: {e}"),
                )
            })?;
        // gRPC is HTTP/2 only.
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }
}

/// Checks the TLS files every `interval` and publishes a rebuilt configuration on `sender`
/// when their contents change, until `cancel`. A change that does not build is logged once
/// and the previous configuration stays.
pub async fn reload_loop(
    files: TlsFiles,
    initial: LoadedTls,
    sender: watch::Sender<Arc<rustls::ServerConfig>>,
    interval: Duration,
    cancel: CancellationToken,
) {
    let mut current = initial.fingerprint;
    let mut refused: Option<[u8; 32]> = None;
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let files_now = files.clone();
        // File reads and key parsing are blocking work.
        let attempt = tokio::task::spawn_blocking(move || {
            let contents = files_now.read()?;
            let fingerprint = contents.fingerprint();
            Ok::<_, TlsError>((fingerprint, contents, files_now))
        })
        .await;
        let (fingerprint, contents, files_now) = match attempt {
            Ok(Ok(read)) => read,
            Ok(Err(error)) => {
                // A file briefly missing mid-rotation is normal; keep serving.
                tracing::debug!(%error, "TLS files not readable now; keeping the current configuration");
                continue;
            }
            Err(error) => {
                tracing::error!(%error, "TLS reload task failed");
                continue;
            }
        };
        if fingerprint == current || Some(fingerprint) == refused {
            continue;
        }
        match files_now.build(&contents) {
            Ok(config) => {
                current = fingerprint;
                refused = None;
                sender.send_replace(config);
                tracing::info!(
                    "TLS files changed: new connections use the new certificate, key, CA and CRLs"
                );
            }
            Err(error) => {
                refused = Some(fingerprint);
                tracing::warn!(%error, "TLS files changed but do not make a working configuration; keeping the previous one");
            }
        }
    }
}
