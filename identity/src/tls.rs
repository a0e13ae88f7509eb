//! rustls configurations for mesh mTLS: TLS 1.3 only, certificates chained to the mesh's trust
//! bundle, and the peer's SPIFFE identity checked by a policy during the handshake, so that a
//! refused peer gets a TLS alert and never a byte of application data.
//!
//! Server names are not how mesh peers are named (a gateway is dialled by address, and its
//! certificate names a SPIFFE identity, not a host), so the client side checks the chain and
//! then the identity, instead of matching a DNS name.

use std::fmt;
use std::sync::{Arc, RwLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::ResolvesClientCert;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ParsedCertificate, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, OtherError,
    RootCertStore, ServerConfig, SignatureScheme,
};

use crate::ca::Credential;
use crate::cert::{self, CertError, LeafInfo};
use crate::id::TrustDomain;

/// Why a TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("trust bundle certificate {index}")]
    Anchor {
        index: usize,
        #[source]
        source: CertError,
    },
    #[error("trust bundle: its anchors name trust domains {0} and {1}; one bundle is one mesh")]
    MixedDomains(String, String),
    #[error("trust bundle certificate {0} is not a usable trust anchor")]
    BadAnchor(usize, #[source] rustls::Error),
    #[error("the credential's certificate chain")]
    Chain(#[source] CertError),
    #[error("the credential's private key")]
    Key(#[source] CertError),
    #[error("the credential's key does not fit its certificate, or is of an unsupported type")]
    KeyMismatch(#[source] rustls::Error),
    #[error("the credential's leaf certificate")]
    Leaf(#[source] CertError),
    #[error("the credential is for trust domain {credential}, the bundle for {bundle}")]
    ForeignCredential { credential: String, bundle: String },
    #[error("cannot build the TLS configuration")]
    Config(#[source] rustls::Error),
}

/// The mesh's trust anchors (one or more, while a rotation is under way), all of one trust
/// domain.
#[derive(Clone)]
pub struct TrustBundle {
    trust_domain: TrustDomain,
    roots: Arc<RootCertStore>,
}

impl fmt::Debug for TrustBundle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TrustBundle")
            .field("trust_domain", &self.trust_domain)
            .field("anchors", &self.roots.len())
            .finish()
    }
}

impl TrustBundle {
    /// Reads a bundle: PEM CA certificates whose URI name is `spiffe://<trust-domain>`.
    pub fn from_pem(pem: &str) -> Result<Self, TlsError> {
        let anchors =
            cert::chain_der(pem).map_err(|source| TlsError::Anchor { index: 0, source })?;
        let mut trust_domain: Option<TrustDomain> = None;
        let mut roots = RootCertStore::empty();
        for (index, anchor) in anchors.into_iter().enumerate() {
            let info =
                cert::ca_info(&anchor).map_err(|source| TlsError::Anchor { index, source })?;
            match &trust_domain {
                Some(domain) if *domain != info.trust_domain => {
                    return Err(TlsError::MixedDomains(
                        domain.to_string(),
                        info.trust_domain.to_string(),
                    ))
                }
                Some(_) => {}
                None => trust_domain = Some(info.trust_domain),
            }
            roots
                .add(anchor)
                .map_err(|error| TlsError::BadAnchor(index, error))?;
        }
        let trust_domain = trust_domain.ok_or(TlsError::Anchor {
            index: 0,
            source: CertError::NoCertificate,
        })?;
        Ok(Self {
            trust_domain,
            roots: Arc::new(roots),
        })
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }
}

/// Decides whether a verified peer may talk to us: `Err` carries the reason, which ends the
/// handshake and reaches the logs of the side that refused.
pub trait PeerPolicy: fmt::Debug + Send + Sync {
    fn admit(&self, peer: &LeafInfo) -> Result<(), String>;
}

/// Admits any identity of one trust domain (the chain already proved the domain's CA signed
/// it; this guards against a bundle shared by several meshes).
#[derive(Debug, Clone)]
pub struct AnyInDomain(pub TrustDomain);

impl PeerPolicy for AnyInDomain {
    fn admit(&self, peer: &LeafInfo) -> Result<(), String> {
        if peer.identity.trust_domain == self.0 {
            Ok(())
        } else {
            Err(format!(
                "{} is not of trust domain {}",
                peer.identity, self.0
            ))
        }
    }
}

/// A refusal by policy, carried in a rustls error so that the reason survives the handshake.
#[derive(Debug, thiserror::Error)]
#[error("peer refused: {0}")]
pub struct Refused(pub String);

fn refused(reason: String) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(Refused(
        reason,
    )))))
}

fn peer_info(end_entity: &CertificateDer<'_>) -> Result<LeafInfo, rustls::Error> {
    cert::leaf_info(end_entity).map_err(|error| {
        refused(format!(
            "not a mesh certificate: {}",
            meridian_common::error_chain(&error)
        ))
    })
}

/// A certificate and key that can be swapped while connections use them: renewal replaces it,
/// new handshakes pick the new one up, established connections are not touched.
#[derive(Debug)]
pub struct LiveCredential {
    current: RwLock<Arc<CertifiedKey>>,
    trust_domain: TrustDomain,
    provider: Arc<CryptoProvider>,
}

impl LiveCredential {
    pub fn new(bundle: &TrustBundle, credential: &Credential) -> Result<Arc<Self>, TlsError> {
        let provider = crate::provider();
        let key = certified_key(bundle.trust_domain(), &provider, credential)?;
        Ok(Arc::new(Self {
            current: RwLock::new(key),
            trust_domain: bundle.trust_domain().clone(),
            provider,
        }))
    }

    /// Replaces the certificate for every handshake from now on.
    pub fn replace(&self, credential: &Credential) -> Result<(), TlsError> {
        let key = certified_key(&self.trust_domain, &self.provider, credential)?;
        *self
            .current
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = key;
        Ok(())
    }

    fn current(&self) -> Arc<CertifiedKey> {
        Arc::clone(
            &self
                .current
                .read()
                .unwrap_or_else(|poisoned| poisoned.into_inner()),
        )
    }
}

fn certified_key(
    trust_domain: &TrustDomain,
    provider: &CryptoProvider,
    credential: &Credential,
) -> Result<Arc<CertifiedKey>, TlsError> {
    let chain = cert::chain_der(&credential.chain_pem).map_err(TlsError::Chain)?;
    let leaf = chain
        .first()
        .map(cert::leaf_info)
        .transpose()
        .map_err(TlsError::Leaf)?
        .ok_or(TlsError::Chain(CertError::NoCertificate))?;
    if leaf.identity.trust_domain != *trust_domain {
        return Err(TlsError::ForeignCredential {
            credential: leaf.identity.trust_domain.to_string(),
            bundle: trust_domain.to_string(),
        });
    }
    let key = cert::key_der(credential.key_pem.expose()).map_err(TlsError::Key)?;
    CertifiedKey::from_der(chain, key, provider)
        .map(Arc::new)
        .map_err(TlsError::KeyMismatch)
}

impl ResolvesServerCert for LiveCredential {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

impl ResolvesClientCert for LiveCredential {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Checks a client's chain against the bundle (webpki), then its identity against a policy.
#[derive(Debug)]
struct MeshClientVerifier {
    chain: Arc<dyn ClientCertVerifier>,
    policy: Arc<dyn PeerPolicy>,
}

impl ClientCertVerifier for MeshClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.chain.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .chain
            .verify_client_cert(end_entity, intermediates, now)?;
        let peer = peer_info(end_entity)?;
        self.policy.admit(&peer).map_err(refused)?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.chain.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.chain.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.chain.supported_verify_schemes()
    }
}

/// Checks a server's chain against the bundle, then its identity against a policy (in place
/// of a DNS name).
#[derive(Debug)]
struct MeshServerVerifier {
    roots: Arc<RootCertStore>,
    provider: Arc<CryptoProvider>,
    policy: Arc<dyn PeerPolicy>,
}

impl ServerCertVerifier for MeshServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        let peer = peer_info(end_entity)?;
        self.policy.admit(&peer).map_err(refused)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A server that requires a client certificate from the bundle whose identity `policy` admits.
pub fn server_config(
    bundle: &TrustBundle,
    credential: Arc<LiveCredential>,
    policy: Arc<dyn PeerPolicy>,
    alpn: &[&[u8]],
) -> Result<ServerConfig, TlsError> {
    let provider = crate::provider();
    let chain = WebPkiClientVerifier::builder_with_provider(
        Arc::clone(&bundle.roots),
        Arc::clone(&provider),
    )
    .build()
    .map_err(|error| TlsError::Config(rustls::Error::General(error.to_string())))?;
    let verifier = MeshClientVerifier { chain, policy };
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsError::Config)?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_cert_resolver(credential);
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// A client that presents `credential` (if any) and accepts a server chained to the bundle
/// whose identity `policy` admits.
pub fn client_config(
    bundle: &TrustBundle,
    credential: Option<Arc<LiveCredential>>,
    policy: Arc<dyn PeerPolicy>,
    alpn: &[&[u8]],
) -> Result<ClientConfig, TlsError> {
    let provider = crate::provider();
    let verifier = MeshServerVerifier {
        roots: Arc::clone(&bundle.roots),
        provider: Arc::clone(&provider),
        policy,
    };
    let builder = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsError::Config)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier));
    let mut config = match credential {
        Some(credential) => builder.with_client_cert_resolver(credential),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// The identity of the peer of an established connection (its first certificate).
pub fn peer_identity(certificates: Option<&[CertificateDer<'_>]>) -> Option<LeafInfo> {
    certificates
        .and_then(|chain| chain.first())
        .and_then(|leaf| cert::leaf_info(leaf).ok())
}
