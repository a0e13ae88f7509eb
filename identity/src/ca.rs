//! The mesh CA: a trust anchor, an issuer it signed, and the certificates the issuer signs for
//! identities that the caller has already authorized.
//!
//! The issuer never takes a name from a request: a CSR contributes only its public key (after
//! its signature is checked), and the identity, lifetime and usages are the caller's. So a
//! joining agent cannot ask for another region by writing it into its CSR.

use std::fmt;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, PublicKeyData, SanType,
    SerialNumber, PKCS_ECDSA_P256_SHA256,
};
use time::OffsetDateTime;

use crate::cert::{self, CertError};
use crate::id::{Identity, TrustDomain};

/// How far back a new certificate's validity starts, for peers whose clocks run a little slow.
const BACKDATE: Duration = Duration::from_secs(5 * 60);

/// What the bootstrap gives the trust anchor: long, since changing it is a rotation.
pub const ANCHOR_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// What the bootstrap gives the issuer.
pub const ISSUER_TTL: Duration = Duration::from_secs(365 * 24 * 3600);

/// Why the CA could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("cannot generate a key")]
    Key(#[source] rcgen::Error),
    #[error("the certificate signing request is invalid (bad PEM, or a signature that does not match its key)")]
    Csr(#[source] rcgen::Error),
    #[error("cannot sign the certificate")]
    Sign(#[source] rcgen::Error),
    #[error("the issuer key is not a PEM private key")]
    IssuerKey(#[source] rcgen::Error),
    #[error("the issuer key does not belong to the issuer certificate")]
    IssuerKeyMismatch,
    #[error("the issuer certificate")]
    IssuerCert(#[source] CertError),
    #[error("the issuer certificate is not a CA certificate of trust domain {0}")]
    NotAnIssuer(String),
    #[error("identity {identity} is not in this CA's trust domain {domain}")]
    ForeignIdentity { identity: String, domain: String },
    #[error("lifetime {0:?} is not between 1 s and 10 years")]
    Lifetime(Duration),
    #[error("cannot draw a random serial number")]
    Random,
}

/// A private key in PEM. Never printed: its `Debug` says only that it is there.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretPem(String);

impl SecretPem {
    pub fn new(pem: String) -> Self {
        Self(pem)
    }

    /// The PEM text, for writing to a private file or handing to rustls.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SecretPem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretPem(<redacted>)")
    }
}

/// A certificate chain (leaf first, then the issuer) and its private key.
#[derive(Debug, Clone)]
pub struct Credential {
    pub chain_pem: String,
    pub key_pem: SecretPem,
    pub not_after: SystemTime,
}

/// A certificate chain (leaf first, then the issuer) signed for a CSR; the key stays with the
/// requester.
#[derive(Debug, Clone)]
pub struct Issued {
    pub chain_pem: String,
    pub not_after: SystemTime,
}

/// A new private key and a CSR for it. The CSR names nothing: the CA decides the identity.
#[derive(Debug)]
pub struct KeyAndCsr {
    pub key_pem: SecretPem,
    pub csr_pem: String,
}

/// Makes an ECDSA P-256 key and a CSR that carries only its public key.
pub fn new_key_and_csr() -> Result<KeyAndCsr, CaError> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(CaError::Key)?;
    let csr = CertificateParams::default()
        .serialize_request(&key)
        .and_then(|csr| csr.pem())
        .map_err(CaError::Csr)?;
    Ok(KeyAndCsr {
        key_pem: SecretPem(key.serialize_pem()),
        csr_pem: csr,
    })
}

/// The issuer: a CA certificate under the mesh's trust anchor and its key.
pub struct Issuer {
    trust_domain: TrustDomain,
    cert_pem: String,
    not_after: SystemTime,
    issuer: rcgen::Issuer<'static, KeyPair>,
}

impl fmt::Debug for Issuer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Issuer")
            .field("trust_domain", &self.trust_domain)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl Issuer {
    /// Loads an issuer from its certificate and key (PEM, as the operator's files hold them).
    /// The certificate must be a CA certificate whose URI SAN is `spiffe://<trust-domain>`.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, CaError> {
        let der = cert::first_der(cert_pem).map_err(CaError::IssuerCert)?;
        let info = cert::ca_info(&der).map_err(CaError::IssuerCert)?;
        let key = KeyPair::from_pem(key_pem).map_err(CaError::IssuerKey)?;
        if info.public_key != key.der_bytes() {
            return Err(CaError::IssuerKeyMismatch);
        }
        let issuer = rcgen::Issuer::from_ca_cert_pem(cert_pem, key).map_err(CaError::IssuerKey)?;
        Ok(Self {
            trust_domain: info.trust_domain,
            cert_pem: cert_pem.trim_end().to_owned() + "\n",
            not_after: info.not_after,
            issuer,
        })
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// When the issuer itself expires: nothing it signs outlives it.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// Signs a certificate for `identity` over the public key of `csr_pem`, valid for `ttl`
    /// (cut to the issuer's own expiry).
    pub fn issue(
        &self,
        csr_pem: &str,
        identity: &Identity,
        ttl: Duration,
        now: SystemTime,
    ) -> Result<Issued, CaError> {
        let request = CertificateSigningRequestParams::from_pem(csr_pem).map_err(CaError::Csr)?;
        let params = self.leaf_params(identity, ttl, now)?;
        let not_after = to_system_time(params.not_after);
        let leaf = CertificateSigningRequestParams {
            params,
            public_key: request.public_key,
        }
        .signed_by(&self.issuer)
        .map_err(CaError::Sign)?;
        Ok(Issued {
            chain_pem: leaf.pem() + &self.cert_pem,
            not_after,
        })
    }

    /// Makes a key and signs a certificate for it: for credentials the CA hands out whole (the
    /// bootstrap's admin, a replica's own serving certificate).
    pub fn issue_credential(
        &self,
        identity: &Identity,
        ttl: Duration,
        now: SystemTime,
    ) -> Result<Credential, CaError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(CaError::Key)?;
        let params = self.leaf_params(identity, ttl, now)?;
        let not_after = to_system_time(params.not_after);
        let leaf = params
            .signed_by(&key, &self.issuer)
            .map_err(CaError::Sign)?;
        Ok(Credential {
            chain_pem: leaf.pem() + &self.cert_pem,
            key_pem: SecretPem(key.serialize_pem()),
            not_after,
        })
    }

    fn leaf_params(
        &self,
        identity: &Identity,
        ttl: Duration,
        now: SystemTime,
    ) -> Result<CertificateParams, CaError> {
        if identity.trust_domain != self.trust_domain {
            return Err(CaError::ForeignIdentity {
                identity: identity.uri(),
                domain: self.trust_domain.to_string(),
            });
        }
        let not_after = (now + checked_ttl(ttl)?).min(self.not_after);
        let mut params = CertificateParams::default();
        params.distinguished_name = common_name(&identity.uri());
        params.subject_alt_names = vec![SanType::URI(uri_san(&identity.uri())?)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        // Every mesh component both serves and calls (an agent serves its API and calls the
        // control plane; a sidecar's gateway serves, its outbound side calls).
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial()?);
        params.not_before = to_offset(now.checked_sub(BACKDATE).unwrap_or(now));
        params.not_after = to_offset(not_after);
        Ok(params)
    }
}

fn checked_ttl(ttl: Duration) -> Result<Duration, CaError> {
    if ttl < Duration::from_secs(1) || ttl > ANCHOR_TTL {
        return Err(CaError::Lifetime(ttl));
    }
    Ok(ttl)
}

fn common_name(name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    // X.509 bounds a common name to 64 characters; the SAN carries the full identity.
    let short: String = name.chars().take(64).collect();
    dn.push(DnType::CommonName, short);
    dn
}

fn uri_san(uri: &str) -> Result<rcgen::string::Ia5String, CaError> {
    uri.to_owned()
        .try_into()
        .map_err(|error: rcgen::Error| CaError::Sign(error))
}

fn random_serial() -> Result<SerialNumber, CaError> {
    let mut bytes = [0u8; 16];
    crate::provider()
        .secure_random
        .fill(&mut bytes)
        .map_err(|_| CaError::Random)?;
    // Positive, and never a leading zero byte that DER would strip.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    Ok(SerialNumber::from_slice(&bytes))
}

fn to_offset(time: SystemTime) -> OffsetDateTime {
    OffsetDateTime::from(time)
}

fn to_system_time(time: OffsetDateTime) -> SystemTime {
    SystemTime::from(time)
}

/// A fresh CA: trust anchor, issuer, and a first admin credential.
#[derive(Debug)]
pub struct Bootstrap {
    pub trust_domain: TrustDomain,
    /// The trust bundle: the anchor's certificate. Public.
    pub anchor_pem: String,
    pub issuer_pem: String,
    pub issuer_key_pem: SecretPem,
    pub admin: Credential,
}

/// Makes a trust anchor for `trust_domain`, an issuer under it, and an admin credential valid
/// for `admin_ttl`. The anchor's key is not kept: rotating the issuer later means a new anchor
/// added to the bundle (zero trust II), never reusing this one's key, which exists nowhere.
pub fn bootstrap(
    trust_domain: &TrustDomain,
    admin_ttl: Duration,
    now: SystemTime,
) -> Result<Bootstrap, CaError> {
    let domain_uri = format!("spiffe://{trust_domain}");
    let ca_params =
        |name: &str, ttl: Duration, path_len: u8| -> Result<CertificateParams, CaError> {
            let mut params = CertificateParams::default();
            params.distinguished_name = common_name(&format!("{trust_domain} {name}"));
            params.subject_alt_names = vec![SanType::URI(uri_san(&domain_uri)?)];
            params.is_ca = IsCa::Ca(BasicConstraints::Constrained(path_len));
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            params.serial_number = Some(random_serial()?);
            params.not_before = to_offset(now.checked_sub(BACKDATE).unwrap_or(now));
            params.not_after = to_offset(now + ttl);
            Ok(params)
        };
    let anchor_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(CaError::Key)?;
    let anchor_params = ca_params("trust anchor", ANCHOR_TTL, 1)?;
    let anchor_cert = anchor_params
        .self_signed(&anchor_key)
        .map_err(CaError::Sign)?;
    let anchor = rcgen::Issuer::new(anchor_params, anchor_key);

    let issuer_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(CaError::Key)?;
    let mut issuer_params = ca_params("issuer", ISSUER_TTL, 0)?;
    issuer_params.use_authority_key_identifier_extension = true;
    let issuer_cert = issuer_params
        .signed_by(&issuer_key, &anchor)
        .map_err(CaError::Sign)?;
    let issuer_key_pem = SecretPem(issuer_key.serialize_pem());
    let issuer = Issuer::from_pem(&issuer_cert.pem(), issuer_key_pem.expose())?;
    let admin = issuer.issue_credential(
        &Identity::user(trust_domain, "admin")
            .map_err(|_| CaError::NotAnIssuer(trust_domain.to_string()))?,
        admin_ttl,
        now,
    )?;
    Ok(Bootstrap {
        trust_domain: trust_domain.clone(),
        anchor_pem: anchor_cert.pem(),
        issuer_pem: issuer_cert.pem(),
        issuer_key_pem,
        admin,
    })
}
