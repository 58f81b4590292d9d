//! A throw-away PKI for the TLS listeners: a CA and a leaf for `localhost` signed by it, so
//! clients verify the server the way they would in production (chain to a trust anchor, name
//! match) instead of switching verification off.

use anyhow::Context as _;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// The name in the server certificate; also the `[tls] fqdn` of test configurations.
pub const SERVER_NAME: &str = "localhost";

#[derive(Clone, Debug)]
pub struct TestPki {
    /// The CA certificate, PEM (for clients such as `turnutils_uclient -E`).
    pub ca_pem: String,
    /// The CA certificate, DER (a trust anchor for the Rust client).
    pub ca_der: CertificateDer<'static>,
    /// The server's `localhost` certificate, PEM.
    pub cert_pem: String,
    /// The server's private key, PEM (PKCS#8).
    pub key_pem: String,
}

/// A fresh CA and a `localhost` server certificate signed by it.
pub fn localhost() -> anyhow::Result<TestPki> {
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "Rampart test CA");
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca = ca_params.self_signed(&ca_key)?;

    let leaf_key = KeyPair::generate()?;
    let mut leaf_params = CertificateParams::new(vec![SERVER_NAME.to_owned()])?;
    leaf_params
        .distinguished_name
        .push(DnType::CommonName, SERVER_NAME);
    leaf_params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    leaf_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let leaf = leaf_params.signed_by(&leaf_key, &ca, &ca_key)?;

    Ok(TestPki {
        ca_pem: ca.pem(),
        ca_der: ca.der().clone(),
        cert_pem: leaf.pem(),
        key_pem: leaf_key.serialize_pem(),
    })
}

/// A certificate chain and its private key from PEM text.
pub fn certificate_and_key(
    cert_pem: &[u8],
    key_pem: &[u8],
) -> anyhow::Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
    let certs = rustls_pemfile::certs(&mut &cert_pem[..])
        .collect::<Result<Vec<_>, _>>()
        .context("reading PEM certificates")?;
    let key = rustls_pemfile::private_key(&mut &key_pem[..])
        .context("reading a PEM private key")?
        .context("no private key in the PEM")?;
    Ok((certs, key))
}
