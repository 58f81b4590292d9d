//! The names a certificate carries in its subjectAltName: what the control service and the
//! agent match peers against.

use std::fmt;

use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

/// A subject alternative name of a client certificate.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum SanName {
    /// A DNS name, lower-cased (DNS names compare case-insensitively).
    Dns(String),
    /// A URI (compared exactly, e.g. a SPIFFE id).
    Uri(String),
}

impl fmt::Display for SanName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SanName::Dns(name) => write!(f, "dns:{name}"),
            SanName::Uri(uri) => write!(f, "uri:{uri}"),
        }
    }
}

/// Why a certificate's names could not be read.
#[derive(Debug, thiserror::Error)]
#[error("the certificate cannot be parsed: {0}")]
pub struct SanError(String);

/// The DNS and URI SANs of a DER certificate. Other SAN kinds (IP, e-mail, directory names)
/// are ignored: the allow lists do not use them.
pub fn san_names(der: &[u8]) -> Result<Vec<SanName>, SanError> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| SanError(e.to_string()))?;
    let Some(san) = cert
        .subject_alternative_name()
        .map_err(|e| SanError(e.to_string()))?
    else {
        return Ok(Vec::new());
    };
    Ok(san
        .value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::DNSName(dns) => Some(SanName::Dns(dns.to_ascii_lowercase())),
            GeneralName::URI(uri) => Some(SanName::Uri((*uri).to_owned())),
            _ => None,
        })
        .collect())
}
