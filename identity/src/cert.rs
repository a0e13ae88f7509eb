//! Reading certificates: PEM to DER, and what a mesh certificate says (identity, validity).

use std::time::{Duration, SystemTime};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer;

use crate::id::{IdError, Identity, TrustDomain};

/// Why a certificate is not what the mesh needs.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("no PEM certificate found")]
    NoCertificate,
    #[error("not a PEM certificate list")]
    Pem(#[source] rustls::pki_types::pem::Error),
    #[error("no PEM private key found")]
    NoKey(#[source] rustls::pki_types::pem::Error),
    #[error("not an X.509 certificate")]
    Der,
    #[error("has {0} spiffe:// URI names; a mesh certificate has exactly one")]
    UriCount(usize),
    #[error("its identity")]
    Identity(#[source] IdError),
    #[error("is not a CA certificate")]
    NotCa,
}

/// Every certificate in `pem`, in order.
pub fn chain_der(pem: &str) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let chain = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(CertError::Pem)?;
    if chain.is_empty() {
        return Err(CertError::NoCertificate);
    }
    Ok(chain)
}

/// The first certificate in `pem`.
pub fn first_der(pem: &str) -> Result<CertificateDer<'static>, CertError> {
    chain_der(pem)?
        .into_iter()
        .next()
        .ok_or(CertError::NoCertificate)
}

/// The private key in `pem`.
pub fn key_der(pem: &str) -> Result<PrivateKeyDer<'static>, CertError> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(CertError::NoKey)
}

/// What a leaf certificate of the mesh says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeafInfo {
    pub identity: Identity,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// The serial number in lowercase hex: what a revocation names.
    pub serial: String,
}

impl LeafInfo {
    /// When to renew: two thirds into the lifetime (so a missed renewal has a third left).
    pub fn renew_at(&self) -> SystemTime {
        let lifetime = self
            .not_after
            .duration_since(self.not_before)
            .unwrap_or(Duration::ZERO);
        self.not_before + lifetime * 2 / 3
    }
}

/// What a CA certificate of the mesh says.
#[derive(Debug, Clone)]
pub struct CaInfo {
    pub trust_domain: TrustDomain,
    pub not_after: SystemTime,
    /// The raw public key bits, to match a private key against.
    pub public_key: Vec<u8>,
}

fn parse<'a>(der: &'a CertificateDer<'_>) -> Result<X509Certificate<'a>, CertError> {
    X509Certificate::from_der(der)
        .map(|(_, cert)| cert)
        .map_err(|_| CertError::Der)
}

fn spiffe_uri(cert: &X509Certificate<'_>) -> Result<String, CertError> {
    let uris: Vec<&str> = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|name| match name {
                    GeneralName::URI(uri) if uri.starts_with("spiffe://") => Some(*uri),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    match uris.as_slice() {
        [uri] => Ok((*uri).to_owned()),
        _ => Err(CertError::UriCount(uris.len())),
    }
}

fn system_time(time: x509_parser::time::ASN1Time) -> SystemTime {
    SystemTime::from(time.to_datetime())
}

/// Reads a leaf certificate's identity and validity.
pub fn leaf_info(der: &CertificateDer<'_>) -> Result<LeafInfo, CertError> {
    let cert = parse(der)?;
    let identity = spiffe_uri(&cert)?
        .parse::<Identity>()
        .map_err(CertError::Identity)?;
    let serial = cert
        .raw_serial()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Ok(LeafInfo {
        identity,
        not_before: system_time(cert.validity().not_before),
        not_after: system_time(cert.validity().not_after),
        serial,
    })
}

/// Reads a CA certificate's trust domain (its `spiffe://<domain>` URI name) and expiry.
pub fn ca_info(der: &CertificateDer<'_>) -> Result<CaInfo, CertError> {
    let cert = parse(der)?;
    if !cert.is_ca() {
        return Err(CertError::NotCa);
    }
    let uri = spiffe_uri(&cert)?;
    let domain = uri.trim_start_matches("spiffe://").trim_end_matches('/');
    let trust_domain = TrustDomain::new(domain).map_err(CertError::Identity)?;
    Ok(CaInfo {
        trust_domain,
        not_after: system_time(cert.validity().not_after),
        public_key: cert.public_key().subject_public_key.data.to_vec(),
    })
}
