//! What the control tests share: a throwaway PKI made with rcgen, a control server on
//! 127.0.0.1 port 0 with its files in a temporary directory, and mutual-TLS clients.

#![allow(dead_code)] // Each test binary uses part of this module.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls::RootCertStore;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use control::Config;

/// Every test step that waits on the network waits at most this long.
pub const STEP: Duration = Duration::from_secs(10);

pub const SERVER_NAME: &str = "control.rampart.test";
pub const FRONT_END: &str = "front-end.rampart.test";
pub const AGENT: &str = "edge-1.agents.rampart.test";
pub const OPERATOR_URI: &str = "spiffe://rampart.test/operator";
pub const NOBODY: &str = "nobody.rampart.test";
pub const REST_SECRET: &str = "test-secret-0123456789";

/// A certificate authority.
pub struct Pki {
    ca: rcgen::Certificate,
    ca_key: KeyPair,
}

/// A certificate and its key, as PEM and as rustls values.
pub struct Identity {
    pub cert_pem: String,
    pub key_pem: String,
    pub chain: Vec<CertificateDer<'static>>,
    pub key_der: Vec<u8>,
}

impl Identity {
    pub fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(self.key_der.clone().into())
    }
}

impl Pki {
    pub fn new(name: &str) -> Pki {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        // cRLSign: webpki accepts a CRL only from an issuer whose key usage allows it.
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_key = KeyPair::generate().unwrap();
        let ca = params.self_signed(&ca_key).unwrap();
        Pki { ca, ca_key }
    }

    pub fn ca_pem(&self) -> String {
        self.ca.pem()
    }

    pub fn roots(&self) -> RootCertStore {
        let mut roots = RootCertStore::empty();
        roots.add(self.ca.der().clone()).unwrap();
        roots
    }

    fn issue(&self, sans: Vec<SanType>, serial: u64, server: bool) -> Identity {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("test identity {serial}"));
        params.distinguished_name = dn;
        params.subject_alt_names = sans;
        params.serial_number = Some(SerialNumber::from(serial));
        params.extended_key_usages = vec![if server {
            ExtendedKeyUsagePurpose::ServerAuth
        } else {
            ExtendedKeyUsagePurpose::ClientAuth
        }];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.ca, &self.ca_key).unwrap();
        Identity {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            chain: vec![cert.der().clone()],
            key_der: key.serialize_der(),
        }
    }

    /// A server certificate for `names` (DNS SANs).
    pub fn server(&self, names: &[&str], serial: u64) -> Identity {
        let sans = names
            .iter()
            .map(|n| SanType::DnsName((*n).try_into().unwrap()))
            .collect();
        self.issue(sans, serial, true)
    }

    /// A client certificate with one DNS SAN.
    pub fn client_dns(&self, name: &str, serial: u64) -> Identity {
        self.issue(
            vec![SanType::DnsName(name.try_into().unwrap())],
            serial,
            false,
        )
    }

    /// A client certificate with one URI SAN.
    pub fn client_uri(&self, uri: &str, serial: u64) -> Identity {
        self.issue(vec![SanType::URI(uri.try_into().unwrap())], serial, false)
    }

    /// A CRL revoking `serials`.
    pub fn crl_pem(&self, serials: &[u64]) -> String {
        let params = rcgen::CertificateRevocationListParams {
            this_update: rcgen::date_time_ymd(2024, 1, 1),
            next_update: rcgen::date_time_ymd(2099, 1, 1),
            crl_number: SerialNumber::from(1u64),
            issuing_distribution_point: None,
            revoked_certs: serials
                .iter()
                .map(|serial| rcgen::RevokedCertParams {
                    serial_number: SerialNumber::from(*serial),
                    revocation_time: rcgen::date_time_ymd(2024, 1, 1),
                    reason_code: Some(rcgen::RevocationReason::KeyCompromise),
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        };
        params
            .signed_by(&self.ca, &self.ca_key)
            .unwrap()
            .pem()
            .unwrap()
    }

    pub fn front_end(&self) -> Identity {
        self.client_dns(FRONT_END, 10)
    }
    pub fn agent(&self) -> Identity {
        self.client_dns(AGENT, 11)
    }
    pub fn operator(&self) -> Identity {
        self.client_uri(OPERATOR_URI, 12)
    }
}

/// A running control server and its files.
pub struct TestServer {
    pub addr: SocketAddr,
    pub dir: PathBuf,
    cancel: CancellationToken,
    handle: JoinHandle<Result<(), control::Error>>,
}

/// The configuration the tests run with; `extra_tls` goes into the [tls] section.
pub fn config_text(extra_tls: &str) -> String {
    format!(
        r#"
        listen = "127.0.0.1:0"
        database = "control.redb"
        [tls]
        certificate = "server.pem"
        private_key = "server.key"
        client_ca = "ca.pem"
        server_name = "{SERVER_NAME}"
        reload_interval = 1
        {extra_tls}
        [limits]
        handshake_timeout = 5
        [roles]
        front_end = ["dns:{FRONT_END}"]
        relay_agent = ["dns:*.agents.rampart.test"]
        operator = ["uri:{OPERATOR_URI}"]
        [credentials]
        rest_secret = "{REST_SECRET}"
        lifetime = 3600
        [turn]
        host = "av.rampart.test"
        "#
    )
}

/// Writes the server's certificate, key and client CA into `dir`.
pub fn write_tls_files(dir: &Path, pki: &Pki, server: &Identity) {
    std::fs::write(dir.join("server.pem"), &server.cert_pem).unwrap();
    std::fs::write(dir.join("server.key"), &server.key_pem).unwrap();
    std::fs::write(dir.join("ca.pem"), pki.ca_pem()).unwrap();
}

impl TestServer {
    /// Starts a server on the files already in `dir` with `config` (see [`config_text`]).
    /// `tweak` adjusts the validated configuration (e.g. a faster reload for a test).
    pub async fn start_with(
        dir: &Path,
        config: &str,
        tweak: impl FnOnce(&mut Config),
    ) -> TestServer {
        let mut config = Config::parse(config, dir).unwrap();
        tweak(&mut config);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cancel = CancellationToken::new();
        let handle = tokio::spawn(control::serve(config, listener, cancel.clone()));
        TestServer {
            addr,
            dir: dir.to_owned(),
            cancel,
            handle,
        }
    }

    /// A fresh directory with a server certificate from `pki` and a running server.
    pub async fn start(dir: &Path, pki: &Pki) -> TestServer {
        write_tls_files(dir, pki, &pki.server(&[SERVER_NAME], 1));
        Self::start_with(dir, &config_text(""), |_| {}).await
    }

    /// Stops the server and waits until it has closed its database.
    pub async fn stop(self) {
        self.cancel.cancel();
        tokio::time::timeout(STEP, self.handle)
            .await
            .expect("the server stops in time")
            .unwrap()
            .unwrap();
    }
}

/// A TLS 1.3 client configuration presenting `identity` and trusting `pki`'s CA.
pub fn client_config(pki: &Pki, identity: &Identity) -> Arc<rustls::ClientConfig> {
    control::client::client_config(pki.roots(), identity.chain.clone(), identity.key()).unwrap()
}

/// A gRPC channel to `addr` over mutual TLS.
pub async fn channel(addr: SocketAddr, config: Arc<rustls::ClientConfig>) -> Channel {
    channel_named(addr, config, SERVER_NAME).await.unwrap()
}

pub async fn channel_named(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    name: &str,
) -> Result<Channel, control::client::ClientError> {
    let name = ServerName::try_from(name.to_owned()).unwrap();
    tokio::time::timeout(STEP, control::client::connect(addr, name, config))
        .await
        .expect("connecting does not hang")
}

/// Connects with `config`, completes the client's side of the handshake, and reads. With
/// TLS 1.3 the client finishes its handshake before the server has checked the client's
/// certificate, so a refusal shows as an alert on the first read; an accepted connection
/// reads the server's HTTP/2 SETTINGS frame. Ok(()) if the server accepted us.
pub async fn probe(addr: SocketAddr, config: Arc<rustls::ClientConfig>) -> Result<(), String> {
    let attempt = async {
        let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let name = ServerName::try_from(SERVER_NAME).unwrap();
        let mut tls = tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        // The HTTP/2 client preface, so a server that accepted us has a reason to answer.
        tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
            .await
            .map_err(|e| format!("write: {e}"))?;
        let mut buf = [0u8; 64];
        match tls.read(&mut buf).await {
            Ok(0) => Err("closed by the server".to_owned()),
            Ok(_) => Ok(()),
            Err(e) => Err(format!("read: {e}")),
        }
    };
    tokio::time::timeout(STEP, attempt)
        .await
        .expect("the probe does not hang")
}

/// Seconds since the Unix epoch.
pub fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}
