//! Mesh identity: SPIFFE-style identities, the mesh CA that bootstraps a trust anchor and
//! issues certificates, and the rustls configurations that prove and check them.
//!
//! One crypto provider (aws-lc-rs, through rustls) serves the whole tree; nothing here implements
//! cryptography.

pub mod ca;
pub mod cert;
pub mod files;
pub mod id;
pub mod tls;
pub mod ttl;

pub use ca::{
    bootstrap, new_key_and_csr, Bootstrap, CaError, Credential, Issued, Issuer, SecretPem,
};
pub use cert::{leaf_info, CertError, LeafInfo};
pub use id::{IdError, Identity, Role, TrustDomain};
pub use tls::{client_config, server_config, AnyInDomain, LiveCredential, PeerPolicy, TrustBundle};

/// The crypto provider of every TLS configuration and random draw in the mesh.
pub fn provider() -> std::sync::Arc<rustls::crypto::CryptoProvider> {
    std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}
